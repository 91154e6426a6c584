"""One Policy for every caller: the same prompt ids, BOS and stops in training rollouts, the MEL
replay, evaluation and ``generate()``; stop strings that keep log-probs aligned."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from meljax.config.settings import base_config, settings
from meljax.data import Problem
from meljax.data.prompts import PromptConfig
from meljax.evaluation import EvalConfig, evaluate
from meljax.meta import MetaExperiencePipeline
from meljax.meta.templates import fill_replay_prompt
from meljax.rewards import RewardConfig, RewardResult, Verifier
from meljax.rl.rollout import run_rollouts
from meljax.rl.update import make_compute_logprobs
from meljax.sampling import ContinuousEngine, SamplingParams, generate
from meljax.sampling.policy import Policy
from meljax.trainer import setup

QUESTION = "What is 1 plus 1?"


def _model_sections(cfg):
    """``(model, model.random, seed)`` of ``cfg``: what ``setup.build_model_and_tokenizer`` takes."""
    s = settings(cfg)
    return s.model, s.random, s.run.seed


def tiny_cfg(model_type: str, template: str):
    cfg = base_config()
    cfg.unlock()
    cfg.model.random_init = True
    cfg.model.random.model_type = model_type
    cfg.model.random.num_layers = 1
    cfg.data.instruction = "demo"
    cfg.data.prompt_template = template
    cfg.data.max_prompt_tokens = 96
    cfg.data.stop_strings = ("\nQuestion:",)
    cfg.rollout.num_questions = 1
    cfg.rollout.group_size = 2
    cfg.rollout.max_new_tokens = 4
    cfg.mel.analysis_max_prompt_tokens = 1600
    cfg.mel.analysis_max_new_tokens = 4
    cfg.mel.replay_max_new_tokens = 4
    cfg.mel.filter_leaks = False
    cfg.reward.num_workers = 0
    cfg.lock()
    return cfg


class Recorder:
    """Wraps ``ContinuousEngine.generate`` (the real one runs) and records what every caller
    sent it."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real = ContinuousEngine.generate

        def generate(engine, params, requests, key, progress=None):
            self.calls.append(
                {
                    "prompts": [list(map(int, r.prompt_ids)) for r in requests],
                    "stops": engine.stop_token_ids,
                    "pad": engine.pad_id,
                }
            )
            return real(engine, params, requests, key, progress)

        monkeypatch.setattr(ContinuousEngine, "generate", generate)

    def take(self) -> list[dict]:
        out, self.calls = self.calls, []
        return out


class AcceptAll:
    def score(self, completions, answers):
        return [RewardResult(1.0, "correct", None) for _ in completions]


@pytest.mark.parametrize("template", ["chat", "raw"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_every_caller_sends_the_same_prompt_and_stops(model_type, template, monkeypatch):
    cfg = tiny_cfg(model_type, template)
    s = settings(cfg)
    model, tok = setup.build_model_and_tokenizer(*_model_sections(cfg))
    graphdef, params = nnx.split(model)
    rec = Recorder(monkeypatch)
    policy = setup.build_policy(settings(cfg), graphdef, tok)
    weights = policy.prepare(params)
    expected = policy.encode(QUESTION)
    problem = Problem("q", QUESTION, "2")

    # 1. training rollouts
    with Verifier(RewardConfig(num_workers=0, mode="last_number")) as verifier:
        run_rollouts(
            policy=policy,
            weights=weights,
            verifier=verifier,
            problems=[problem],
            sampling=s.rollout.sampling(),
            key=jax.random.key(0),
            advantage="grpo",
        )
        (rollout,) = rec.take()
        # 2. evaluation (what `meljax eval --workdir` runs: the run's PromptConfig)
        evaluate(
            policy,
            weights,
            verifier,
            {"b": [problem]},
            EvalConfig(num_samples=2, max_new_tokens=4),
            progress=False,
        )
        (evaluation,) = rec.take()  # greedy and sampled requests in one engine run
    # 3. generate() with the run's prompt settings (its own Policy, its own sampler)
    generate(model, tok, [QUESTION], max_new_tokens=4, temperature=0.0, prompt=s.prompt)
    (gen,) = rec.take()
    # 4. the MEL analysis and replay. A greedy analysis of a random model rarely ends by
    # itself, so a stop string taken from its own text ends it (and it is replayed).
    meta = dataclasses.replace(
        s.mel,
        analysis_temperature=0.0,
        analysis_max_new_tokens=12,
        filter_malformed=False,  # a random model writes no sections; the replay is under test
    )

    def mel(p):
        pipe = MetaExperiencePipeline(policy=p, verifier=AcceptAll(), config=meta)
        return pipe, pipe.run(
            weights, 1, [problem], ["a 1", "a 2"], [0.0, 1.0], 2, jax.random.key(1)
        )

    pipe, res = mel(policy)
    mel_policy = policy
    if not res.counts.replayed:
        text = res.records[0]["text"]
        stop = next(
            text[k : k + 2]
            for k in range(2, len(text) - 1)
            if text[: text.find(text[k : k + 2])].strip()
        )
        prompt = dataclasses.replace(policy.prompt, stop_strings=(stop,))
        mel_policy = Policy(
            tok, policy.engine, prompt, stop_ids=policy.stop_ids, pad_id=policy.pad_id
        )
        rec.take()
        pipe, res = mel(mel_policy)
    analysis, replay = rec.take()[-2:]
    assert res.counts.replayed == 1
    user = fill_replay_prompt(
        res.records[0]["text"],
        QUESTION,
        template=pipe.replay_template,
        instruction=meta.replay_instruction,
    )
    assert replay["prompts"] == [mel_policy.encode_message(user)]
    assert mel_policy.encode(QUESTION) == expected

    for call in (rollout, gen):
        assert call["prompts"] == [expected]
    assert evaluation["prompts"] == [expected, expected]
    for call in (rollout, evaluation, gen, analysis, replay):
        assert call["stops"] == policy.stop_ids and call["pad"] == policy.pad_id
    assert tok.eos_token_id in policy.stop_ids
    # A user message holding the question and the instruction renders like the question.
    assert policy.encode_message(f"{QUESTION}\n{policy.instruction}") == expected
    # BOS: chat templates write their own; raw prompts get the tokenizer's default (none here).
    assert (expected[0] == tok.bos_token_id) == (template == "chat")


def test_bos_policy_always_and_never():
    cfg = tiny_cfg("llama", "raw")
    model, tok = setup.build_model_and_tokenizer(*_model_sections(cfg))
    graphdef = nnx.split(model)[0]
    base = settings(cfg).prompt
    ids = {
        mode: Policy.build(graphdef, tok, dataclasses.replace(base, bos=mode)).encode(QUESTION)
        for mode in ("auto", "always", "never")
    }
    assert ids["always"] == [tok.bos_token_id] + ids["auto"] and ids["never"] == ids["auto"]
    chat = dataclasses.replace(base, prompt_template="chat", bos="never")
    assert Policy.build(graphdef, tok, chat).encode(QUESTION)[0] != tok.bos_token_id


def test_stop_string_cuts_text_tokens_and_logprobs_consistently():
    """A base-style prompt; the stop string is taken from the model's own greedy output so that
    it is sure to occur. The cut completion's log-probs equal a recomputed forward pass over
    exactly the tokens that are trained on."""
    from meljax.rl.batch import build_policy_batch

    cfg = tiny_cfg("qwen3", "raw")
    model, tok = setup.build_model_and_tokenizer(*_model_sections(cfg))
    graphdef, params = nnx.split(model)
    raw = PromptConfig(prompt_template="raw", instruction="demo")
    sampling = SamplingParams(max_new_tokens=24, temperature=0.0)
    free = Policy.build(graphdef, tok, raw)
    weights = free.prepare(params)
    ids = free.encode(QUESTION)
    assert tok.decode(ids).startswith("Question: What is 1 plus 1?")
    (full,) = free.generate(weights, [ids], sampling, jax.random.key(0))[0]
    assert full.finish_reason == "length" and len(full.text) > 12
    stop = full.text[8:11]
    stopped = Policy.build(graphdef, tok, dataclasses.replace(raw, stop_strings=(stop,)))
    (cut,) = stopped.generate(stopped.prepare(params), [ids], sampling, jax.random.key(0))[0]
    assert cut.finish_reason == "stop_string" and not cut.truncated
    assert cut.text == full.text[: full.text.find(stop)] and stop not in cut.text
    n = cut.num_tokens
    np.testing.assert_array_equal(cut.tokens, full.tokens[:n])  # the same tokens, cut
    assert stop in tok.decode(cut.tokens) and stop not in tok.decode(cut.tokens[:-1])
    np.testing.assert_array_equal(cut.logprobs, full.logprobs[:n])

    # What the trainer builds from it: old log-probs at the loss mask == a fresh forward pass.
    batch = build_policy_batch(
        [ids],
        [cut.tokens.tolist()],
        advantages=[1.0],
        rewards=[1.0],
        group_index=[0],
        old_logprobs=[cut.logprobs],
    )
    fresh = np.asarray(make_compute_logprobs(graphdef)(params, batch.seq))
    mask = batch.seq.loss_mask > 0
    assert mask.sum() == n
    np.testing.assert_allclose(fresh[mask], batch.old_logprobs[mask], atol=1e-4)


def test_slots_are_padded_to_the_data_parallel_size():
    from meljax.runtime import sharding as shd

    cfg = tiny_cfg("llama", "chat")
    model, tok = setup.build_model_and_tokenizer(*_model_sections(cfg))
    graphdef, params = nnx.split(model)
    mesh = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    sharded = Policy.build(graphdef, tok, PromptConfig(), mesh=mesh)
    eng = sharded.engine
    g4 = SamplingParams(max_new_tokens=4, temperature=1.0, num_samples=4)
    # slots hold samples: 2 prompts x G=4 = 8 slots on 8 shards; 12 samples -> 16 slots;
    # 3 samples -> 8 slots (one per data shard)
    assert eng.pool_shape(8, 10, 4)[0] == 8
    assert eng.pool_shape(12, 10, 4)[0] == 16
    assert eng.pool_shape(3, 10, 4)[0] == 8
    # And the sharded call with unevenly split prompts gives the one-device result.
    sharded_weights = sharded.prepare(jax.device_put(params, shd.param_shardings(params, mesh)))
    local = Policy.build(graphdef, tok, PromptConfig())
    ids = [local.encode("1+1?"), local.encode("2+2?")]
    a = sharded.generate(sharded_weights, ids, g4, jax.random.key(5))
    b = local.generate(local.prepare(params), ids, g4, jax.random.key(5))
    for x, y in zip(sum(a, []), sum(b, []), strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)


def test_prompt_limit_is_one_rule():
    from meljax.data.prompts import prompt_limit

    assert prompt_limit(0, 2048, 1024) == 1024  # the model's context less the answer budget
    assert prompt_limit(512, 2048, 256) == 512  # the configured limit when smaller
    assert prompt_limit(0, None, 256) is None and prompt_limit(96, None, 256) == 96
    with pytest.raises(ValueError, match="max_new_tokens=2048 leaves no room for a prompt"):
        prompt_limit(0, 2048, 2048)


def test_prompts_longer_than_the_context_are_cut_counted_and_warned_once(monkeypatch, caplog):
    """A question far longer than the model's context: evaluation prefilled all of it (the
    200,000-character question ran 10 minutes at 0/8) and training cut it silently. Now
    training, evaluation and generate() cut it by one rule, count it and warn once."""
    import logging

    import meljax.sampling.policy as policy_module
    from meljax.models import Transformer

    monkeypatch.setattr(policy_module, "_warned_cut", False)
    cfg = tiny_cfg("llama", "raw")
    _, tok = setup.build_model_and_tokenizer(*_model_sections(cfg))
    arch = dataclasses.replace(
        setup.random_model_config(*_model_sections(cfg)[:2], tok), max_position_embeddings=64
    )
    graphdef, params = nnx.split(Transformer(arch, rngs=nnx.Rngs(0)))
    policy = Policy.build(graphdef, tok, PromptConfig(prompt_template="raw", max_prompt_tokens=0))
    weights = policy.prepare(params)
    assert policy.context_len == 64
    question = "Add these numbers. " * 60 + "What is 1 plus 1?"
    full = policy.encode_text(policy.render(question))
    assert len(full) > 64
    with caplog.at_level(logging.WARNING):
        ids = policy.encode(question, max_new_tokens=16)  # 64 - 16 = 48 tokens kept: the end
        assert ids == full[-48:] and policy.prompts_cut == 1
        with Verifier(RewardConfig(num_workers=0, mode="last_number")) as verifier:
            ro = run_rollouts(
                policy=policy,
                weights=weights,
                verifier=verifier,
                problems=[Problem("q", question, "2")],
                sampling=SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=2),
                key=jax.random.key(0),
                advantage="grpo",
            )
            report = evaluate(
                policy,
                weights,
                verifier,
                {"b": [Problem("q", question, "2")]},
                EvalConfig(num_samples=0, max_new_tokens=16),
                progress=False,
            )
        (out,) = policy.generate(
            weights, [full], SamplingParams(max_new_tokens=32), jax.random.key(0)
        )
    assert len(ro.prompt_ids[0]) == 56 and ro.metrics()["data/prompts_cut"] == 1.0
    assert report.counts["prompts_cut"] == 1 and report.records[0].prompt_tokens == 48
    assert report.to_json()["counts"]["prompts_cut"] == 1
    assert len(out) == 1 and policy.prompts_cut == 4  # generate() cut its plain ids too
    warned = [r for r in caplog.records if "was cut to its last" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
