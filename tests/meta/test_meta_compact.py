"""The compact analysis format (``mel.analysis_format=compact``) end to end on a tiny model: a
planted lesson is parsed, kept after a passing replay, trained in by the NLL term, and dropped
when its replay fails or it leaks the answer; plus the ``meljax lessons`` summaries."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from meljax.commands.lessons import lessons_text
from meljax.data.prompts import PromptConfig
from meljax.meta import (
    META_LOG_FILE,
    MetaConfig,
    MetaExperiencePipeline,
    filters,
    formats,
    parse,
    trim,
)
from meljax.meta import lessons as meta_lessons
from meljax.models.tokenizer import make_tiny_tokenizer
from meljax.rewards import RewardResult
from meljax.rl.batch import TrainBatch, build_policy_batch
from meljax.rl.objective import LossConfig
from meljax.rl.optim import OptimizerConfig, make_optimizer
from meljax.rl.update import init_train_state, make_compute_logprobs, make_train_step
from meljax.sampling.policy import Policy
from tests.conftest import scripted_result, small_llama_params
from tests.reference_sampler import SamplerEngine

TOK = make_tiny_tokenizer()
LESSON = (
    "Rule: When I add two numbers, I count on from the larger one.\n"
    "Mistake: The wrong answer counted down instead of up."
)
LEAKY = "Rule: When I add these, I write 8 and stop.\nMistake: The wrong answer wrote 7."


class Q:
    id, question, answer = "q0", "What is 3 plus 5?", "8"


class Scripted:
    """Sampler double: analysis prompts get ``analysis``, replay prompts get ``replay``."""

    def __init__(self, analysis: str, replay: str):
        self.analysis, self.replay, self.replays = analysis, replay, 0

    def sample(self, params, prompts, sampling, key):
        m, rows = sampling.max_new_tokens, []
        for p in prompts:
            is_replay = "Note to self:" in TOK.decode(list(p))
            self.replays += is_replay
            reply = self.replay if is_replay else self.analysis
            ids = (TOK.encode(reply, add_special_tokens=False) + [TOK.eos_token_id])[:m]
            rows += [ids] * sampling.num_samples
        return scripted_result(rows, m)


class LastWord:
    """Verifier double: the last word of the answer is its final answer."""

    def score(self, completions, answers):
        ok = [
            x.strip().rstrip(".").split()[-1] == y
            for x, y in zip(completions, answers, strict=True)
        ]
        return [RewardResult(float(o), "correct" if o else "mismatch", None) for o in ok]


ANSWERS = ["It is 8", "It is 7", "It is 8", "It is 9"]


def compact_step(engine, workdir=None, **meta):
    """One MEL step of the compact format over the sampler double ``engine``: the question
    ``Q`` with answers ``ANSWERS`` (two right, two wrong), one pair, tiny budgets; ``meta``
    overrides ``MetaConfig`` fields."""
    policy = Policy(
        TOK,
        SamplerEngine(engine),
        PromptConfig(instruction="none"),
        stop_ids=[TOK.eos_token_id],
        pad_id=TOK.pad_token_id,
    )
    pipeline = MetaExperiencePipeline(
        policy=policy,
        verifier=LastWord(),
        config=MetaConfig(
            analysis_format="compact",
            analysis_max_prompt_tokens=1600,
            analysis_max_new_tokens=160,  # characters: the compact lesson and its stop token
            replay_max_new_tokens=16,
            max_pairs_per_query=1,
            **meta,
        ),
        workdir=None if workdir is None else str(workdir),
    )
    return pipeline.run(None, 1, [Q], ANSWERS, [1.0, 0.0, 1.0, 0.0], 4, jax.random.key(0))


def run_step(analysis: str, replay: str, workdir=None, filter_copies: bool = True):
    engine = Scripted(analysis.removeprefix(formats.COMPACT_PREFIX), replay)  # prompt has it
    return compact_step(engine, workdir, filter_copies=filter_copies), engine


# ----------------------------------------------------------------------------- parsing


def test_planted_compact_lesson_is_parsed():
    p = parse.parse_compact(LESSON)
    assert p.mistake == "The wrong answer counted down instead of up."
    assert p.rule == "When I add two numbers, I count on from the larger one."
    assert not p.malformed
    assert formats.lesson_text(p.as_dict()) == p.rule


@pytest.mark.parametrize(
    "text",
    [
        "**Rule:** When I add, I count up.\n**Mistake:** A counted down.",
        "- Rule: When I add, I count up.\n- Mistake: A counted down.\nThat is all.",
        "Contrast: A counted down.\nLesson: When I add, I count up.",  # contrast first
        "Mistake: A counted down. Rule: When I add, I count up.",  # rule on the same line
        "Rule: When I add, I count up.",  # the contrast is optional
    ],
)
def test_compact_labels_in_common_decorations(text):
    p = parse.parse_compact(text)
    assert not p.malformed, p
    assert p.rule == "When I add, I count up."
    assert p.mistake in (None, "A counted down.")


@pytest.mark.parametrize(
    "text",
    [
        "Hello! I am ready to help you with your math problem.",
        "Mistake: A counted down.",  # no rule
        "Rule: Be careful.\nMistake: A counted down.",  # too short to act on
        "Rule:\nMistake: A counted down.",  # empty rule
        "1. Failure point\nA slipped.\n2. Success factors\nB.\n3. Reflective summary\nI.\n"
        "4. Heuristics\nWhen adding, count on.",  # the paper format is not the compact one
    ],
)
def test_compact_without_a_lesson_is_malformed(text):
    assert parse.parse_compact(text).malformed
    reason = filters.filter_reason(text, truncated=False, answer="8", analysis_format="compact")
    assert reason == "malformed"


def test_filters_apply_to_compact():
    ok = filters.filter_reason(LESSON, truncated=False, answer="8", analysis_format="compact")
    assert ok == "ok"
    assert filters.filter_reason(LESSON, truncated=True, answer="8", analysis_format="compact") == (
        "truncated"
    )
    assert filters.filter_reason(LEAKY, truncated=False, answer="8", analysis_format="compact") == (
        "leak"
    )
    assert filters.filter_reason(" \n", truncated=False, answer="8", analysis_format="compact") == (
        "empty"
    )
    # the paper parser still judges the paper format
    assert filters.filter_reason(LESSON, truncated=False, answer="8") == "malformed"


def test_analysis_format_is_validated():
    with pytest.raises(ValueError, match="analysis_format"):
        MetaConfig(analysis_format="haiku")
    assert MetaConfig().analysis_format == "paper"


def test_compact_template_fills_the_required_fields():
    t = formats.COMPACT_ANALYSIS_TEMPLATE
    for field in ("{question}", "{incorrect_answer}", "{correct_answer}"):
        assert t.count(field) == 1
    assert "Rule: When" in t and "Mistake:" in t  # the worked example the instruction shows


# ----------------------------------------------------------------------------- the pipeline


def test_compact_lesson_kept_after_passing_replay_and_logged(tmp_path):
    meta, engine = run_step(LESSON, "So 8.", workdir=tmp_path)
    assert meta.counts.generated == 1 and meta.counts.kept == 1 and engine.replays == 1
    assert meta.counts.kept_tokens == meta.counts.analysis_tokens > 0
    rows = np.nonzero(meta.batch.weight)[0]
    target = meta.batch.tokens[rows[0]][meta.batch.loss_mask[rows[0]] > 0]
    # the reply prefix is in the context (the prompt), the rest of the lesson is the target
    decoded = TOK.decode(list(target), skip_special_tokens=True)
    assert decoded == LESSON.removeprefix(formats.COMPACT_PREFIX)
    context = meta.batch.tokens[rows[0]][(meta.batch.loss_mask[rows[0]] == 0)]
    assert TOK.decode(list(context), skip_special_tokens=True).endswith(formats.COMPACT_PREFIX)
    (rec,) = [json.loads(x) for x in (tmp_path / META_LOG_FILE).read_text().splitlines()]
    assert rec["status"] == "kept" and rec["format"] == "compact"
    assert rec["lesson"] == "When I add two numbers, I count on from the larger one."
    assert rec["sections"]["mistake"] == "The wrong answer counted down instead of up."
    assert rec["pair"]["incorrect_answer"] in ANSWERS[1::2]
    assert rec["pair"]["correct_answer"] == "It is 8"
    assert rec["replay_extracted"] is None and rec["replay_text"] == "So 8."
    assert rec["copied_example"] is False


def test_compact_lesson_dropped_when_replay_fails(tmp_path):
    meta, engine = run_step(LESSON, "So 9.", workdir=tmp_path)
    assert meta.counts.replayed == 1 and meta.counts.kept == 0 and engine.replays == 1
    assert meta.counts.kept_tokens == 0
    assert float(meta.batch.weight.sum()) == 0.0  # nothing reaches the NLL term
    rec = json.loads((tmp_path / META_LOG_FILE).read_text())
    assert rec["status"] == "replay_failed" and rec["replay_text"] == "So 9."


def test_leaking_compact_lesson_dropped_before_replay():
    meta, engine = run_step(LEAKY, "So 8.")
    assert meta.counts.leak == 1 and meta.counts.kept == 0
    assert engine.replays == 0  # a leak never reaches the replay, however it would answer
    assert float(meta.batch.weight.sum()) == 0.0


def test_kept_compact_lesson_rises_in_likelihood():
    meta, _ = run_step(LESSON, "So 8.")
    graphdef, params = small_llama_params(len(TOK))
    prompt = TOK.encode(Q.question, add_special_tokens=False)
    comps = [TOK.encode(a, add_special_tokens=False) for a in ANSWERS]
    # Zero advantages: the policy term is 0, so only the NLL term moves the weights.
    policy = build_policy_batch(
        [prompt] * 4, comps, advantages=[0.0] * 4, rewards=[1, 0, 1, 0], group_index=[0] * 4
    )
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=3e-3, weight_decay=0.0))
    step = make_train_step(graphdef, optimizer, LossConfig(lambda_mel=1.0))
    logprobs = make_compute_logprobs(graphdef)
    state = init_train_state(params, optimizer)
    before = float(np.asarray(logprobs(state, meta.batch)).sum())
    for _ in range(3):
        state, m = step(state, TrainBatch(policy=policy, mel=meta.batch))
        assert float(m["mel_rows"]) == 1.0
    after = float(np.asarray(logprobs(state, meta.batch)).sum())
    assert after > before + 1.0, (before, after)


# ----------------------------------------------------------------------------- meljax lessons


def test_lesson_copied_from_the_example_is_dropped_or_flagged():
    example = "Rule: When I add two numbers, I add them again in the other order to check the sum."
    assert example in formats.COMPACT_ANALYSIS_TEMPLATE
    meta, engine = run_step(example, "So 8.")  # mel.filter_copies is on by default
    assert meta.counts.copied == 1 and meta.counts.kept == 0 and engine.replays == 0
    assert meta.records[0]["status"] == "copied" and meta.records[0]["copied_example"] is True
    assert float(meta.batch.weight.sum()) == 0.0  # a copy never reaches the NLL term
    meta, _ = run_step(example, "So 8.", filter_copies=False)
    assert meta.counts.kept == 1 and meta.records[0]["copied_example"] is True
    assert "copied verbatim from the instruction's example: 1 / 1" in "\n".join(
        meta_lessons.yield_lines(meta.records)
    )


def test_lessons_summaries():
    recs = [
        {"step": 1, "status": "kept", "kept": True, "num_tokens": 30},
        {"step": 1, "status": "truncated", "kept": False, "num_tokens": 64},
        {"step": 2, "status": "replay_failed", "kept": False, "num_tokens": 26},
    ]
    counts = meta_lessons.status_counts(recs)
    assert counts["kept"] == 1 and counts["truncated"] == 1 and counts["leak"] == 0
    assert meta_lessons.token_share(recs) == (30, 120)
    assert list(meta_lessons.by_step(recs)) == [1, 2]
    lines = meta_lessons.yield_lines(recs)
    assert lines[0].startswith("analyses kept / generated: 1 / 3 (33.3%)")
    assert "steps with a kept lesson: 1 / 2" in lines[0]
    rows = [
        {"step": 0, "time/eval": 9.0},
        {"step": 1, "time/meta_analysis": 3.0, "time/meta_replay": 1.0, "time/step": 10.0},
        {"step": 2, "time/meta_analysis": 1.0, "time/meta_replay": 1.0, "time/step": 10.0},
    ]
    o = meta_lessons.mel_overhead(rows)
    assert o == {"steps": 2.0, "analysis_s": 2.0, "replay_s": 1.0, "step_s": 10.0}
    assert "3.0 s of 10.0 s (30.0%" in meta_lessons.overhead_line(rows)
    assert meta_lessons.overhead_line([{"step": 1, "time/step": 2.0}]) is None


def test_lessons_command_lists_kept_and_dropped(tmp_path):
    run_step(LESSON, "So 8.", workdir=tmp_path)
    meta, _ = run_step(LESSON, "So 9.")
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "time/meta_analysis": 2.0, "time/meta_replay": 1.0, "time/step": 6})
        + "\n"
    )
    with open(tmp_path / META_LOG_FILE, "a") as f:
        f.write(json.dumps({**meta.records[0], "step": 2}) + "\n")
    text = lessons_text(str(tmp_path))
    assert "step 1: 1 generated, 1 kept" in text
    assert "step 2: 1 generated, 0 kept (dropped: replay_failed 1)" in text
    assert "lesson: When I add two numbers, I count on from the larger one." in text
    assert "wrong answer: It is" in text and "replay: So 9." in text
    assert "analyses kept / generated: 1 / 2 (50.0%)" in text
    assert "MEL overhead per step: 3.0 s of 6.0 s (50.0%" in text
    assert "[replay_failed]" not in lessons_text(str(tmp_path), show="kept")


# ----------------------------------------------------------------------------- trimming


def _trim(text: str, truncated: bool, stop: bool):
    ids = TOK.encode(text, add_special_tokens=False) + ([TOK.eos_token_id] if stop else [])

    def decode(t):
        return TOK.decode(t, skip_special_tokens=True)

    return trim.trim_compact(ids, text, truncated, decode=decode, stop_id=TOK.eos_token_id)


def test_text_after_the_rule_line_is_trimmed_and_the_target_stops():
    ramble = LESSON + "\n\nExample.\nQuestion: What is 2 plus"
    a = _trim(ramble, truncated=True, stop=False)
    assert a.trimmed and not a.truncated and a.text == LESSON
    assert a.sampled_tokens == len(TOK.encode(ramble, add_special_tokens=False))
    assert a.ids[-1] == TOK.eos_token_id
    assert TOK.decode(a.ids, skip_special_tokens=True).strip() == LESSON
    # a lesson that stopped by itself is left as sampled
    b = _trim(LESSON, truncated=False, stop=True)
    assert not b.trimmed and b.text == LESSON and b.ids[-1] == TOK.eos_token_id


def test_lesson_cut_inside_its_rule_stays_truncated():
    cut = "Rule: When I add two numbers, I cou"
    a = _trim(cut, truncated=True, stop=False)
    assert a.truncated and not a.trimmed and a.text == cut
    no_rule = "Mistake: Answer A counted down.\nMistake: Answer A counted down.\nMis"
    assert _trim(no_rule, truncated=True, stop=False).truncated
    # a cut inside the contrast line that follows the rule: the lesson is not whole either
    assert _trim(LESSON[:-5], truncated=True, stop=False).truncated


def test_rambling_compact_lesson_kept_as_its_trimmed_lesson():
    meta, _ = run_step(LESSON + "\nQuestion: What is 1 plus 1?\nWrong answer: 3", "So 8.")
    assert meta.counts.kept == 1 and meta.records[0]["trimmed"]
    assert meta.records[0]["text"] == LESSON
    assert meta.counts.kept_tokens < meta.counts.analysis_tokens
    rows = np.nonzero(meta.batch.weight)[0]
    target = meta.batch.tokens[rows[0]][meta.batch.loss_mask[rows[0]] > 0]
    decoded = TOK.decode(list(target), skip_special_tokens=True)
    assert formats.COMPACT_PREFIX + decoded.rstrip() == LESSON
    assert target[-1] == TOK.eos_token_id


def test_leak_after_the_lesson_is_not_trained_and_leak_inside_is_dropped():
    # the ramble after the rule is dropped with the trim, so its number cannot leak
    meta, _ = run_step(LESSON + "\nSo the answer is 8.", "So 8.")
    assert meta.counts.kept == 1 and "8" not in meta.records[0]["text"]
    meta, engine = run_step(LEAKY + "\nMore text.", "So 8.")
    assert meta.counts.leak == 1 and engine.replays == 0
