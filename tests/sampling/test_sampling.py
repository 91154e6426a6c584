"""Tests of the jitted grouped-rollout sampler (``meljax.sampling``).

Most tests share one tiny Llama and one set of static shapes (batch bucket 4, prompt bucket 32,
new-token bucket 32, one stop id, G=2) so the jitted core compiles once for all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meljax.models import (
    ModelConfig,
    Transformer,
    abstract_model,
    cache_bytes,
    default_positions,
)
from meljax.runtime import sharding as shd
from meljax.sampling import SamplingParams, filter_logits
from meljax.sampling.select import argmax_last, categorical, config_from_graphdef
from tests.conftest import small_model_config
from tests.reference_sampler import Sampler

VOCAB = 200  # > 128: the inverse-CDF sampler sees two blocks, the second one padded
STOP = 7
PAD = 0
G = 2
PROMPTS = [[5, 6, 10, 11], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [20]]


def tiny_config(model_type: str = "llama") -> ModelConfig:
    return small_model_config(VOCAB, model_type)


def tiny_model(model_type: str = "llama", seed: int = 1) -> Transformer:
    """A tiny model with weights scaled like a trained one (peaked next-token distributions),
    so greedy decoding has clear winners and never hinges on float rounding. Weights come
    from numpy: initialising on device would compile a program per weight shape."""
    graphdef, abstract = abstract_model(tiny_config(model_type))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    rng = np.random.default_rng(seed)
    weights = []
    for path, x in leaves:
        # stacked per-layer weights: one layer's shape (fan-in) is what the scale is about
        shape = x.shape[1:] if "layers" in jax.tree_util.keystr(path) else x.shape
        noise = rng.standard_normal(x.shape).astype(np.float32)
        w = noise / np.sqrt(shape[0]) if len(shape) >= 2 else 1.0 + 0.1 * noise
        weights.append(jnp.asarray(w))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens, kv_mask):
    model = nnx.merge(graphdef, params)
    return model(tokens, default_positions(kv_mask), kv_mask)


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    graphdef, params = nnx.split(model)
    return model, graphdef, params


def make_sampler(graphdef, **kw) -> Sampler:
    kw.setdefault("stop_token_ids", [STOP])
    kw.setdefault("pad_id", PAD)
    kw.setdefault("batch_buckets", (4,))
    return Sampler(graphdef, **kw)


def completion_logits(graphdef, params, prompts, result, width: int = 32) -> np.ndarray:
    """Logits ``[rows, width, V]`` predicting each completion token, recomputed by one full
    (cache-free) forward over LEFT-padded prompt + completion, as a trainer would."""
    p = 32
    rows = len(result)
    g = rows // len(prompts)
    tokens = np.zeros((rows, p + width), np.int32)
    kv = np.zeros(tokens.shape, bool)
    for row in range(rows):
        prompt = prompts[row // g]
        tokens[row, p - len(prompt) : p] = prompt
        kv[row, p - len(prompt) : p] = True
    m = result.tokens.shape[1]
    tokens[:, p : p + m] = result.tokens
    kv[:, p : p + m] = result.mask
    logits = _forward(graphdef, params, jnp.asarray(tokens), jnp.asarray(kv))
    return np.asarray(logits[:, p - 1 : p - 1 + width])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_allowed(logits: np.ndarray, top_p: float, top_k: int) -> np.ndarray:
    """Hugging Face semantics: top-k (ties kept), then the nucleus of the renormalised rest."""
    x = logits.astype(np.float32)
    keep = np.ones(x.shape, bool)
    if top_k > 0:
        kth = np.sort(x)[::-1][min(top_k, x.size) - 1]
        keep &= x >= kth
    if top_p < 1:
        z = np.where(keep, x, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        mass_before = np.cumsum(p[order]) - p[order]
        cut = p[order][mass_before < top_p].min()
        keep &= p >= cut
    return keep


def chi2_bound(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square 0.999 quantile."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def assert_matches_distribution(samples: np.ndarray, probs: np.ndarray) -> None:
    """Chi-square goodness of fit (bins of expected count < 5 merged) at the 0.999 level."""
    n, v = samples.size, probs.size
    counts = np.bincount(samples, minlength=v).astype(np.float64)
    assert counts[probs == 0].sum() == 0, "a zero-probability token was drawn"
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # too little mass in the rest to form its own bin
        obs, exp = obs[:-1], exp[:-1]
        obs[-1] += counts[~big].sum()
        exp[-1] += expected[~big].sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi2_bound(len(obs) - 1), (stat, len(obs))


# ----------------------------------------------------------------------------- greedy parity


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers(model_type, tmp_path, llama):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from meljax.models import save_pretrained

    model = llama[0] if model_type == "llama" else tiny_model(model_type)
    save_pretrained(model, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    hf.eval()
    graphdef, params = nnx.split(model)
    sampling = SamplingParams(max_new_tokens=24, temperature=0.0, num_samples=G)
    result = make_sampler(graphdef).sample(params, PROMPTS, sampling, jax.random.key(0))
    assert result.tokens.shape == (len(PROMPTS) * G, 24)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=STOP,
                pad_token_id=PAD,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ref = out.sequences[0, len(prompt) :].tolist()
        if STOP in ref:  # HF pads a batch-1 output only past EOS; keep up to and with it
            ref = ref[: ref.index(STOP) + 1]
        ref_lp = [
            log_softmax(step[0].numpy())[tok] for step, tok in zip(out.logits, ref, strict=False)
        ]
        for g in range(G):  # greedy: every sample of the group is the same
            row = i * G + g
            assert result.completion(row) == ref, (model_type, i, g)
            n = int(result.lengths[row])
            np.testing.assert_allclose(result.logprobs[row, :n], ref_lp, atol=2e-4)
            assert bool(result.truncated[row]) == (STOP not in ref)


@pytest.mark.slow
def test_demo_model_greedy_matches_transformers():
    """SmolLM2-135M-Instruct: chat prompts, 20 greedy tokens, same as HF generate (torch)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from meljax.data.prompts import PromptConfig
    from meljax.models import demo_model_dir, from_pretrained, load_tokenizer
    from meljax.sampling import generate
    from meljax.sampling.policy import Policy

    path = demo_model_dir()
    tok = load_tokenizer(path)
    model = from_pretrained(path)
    texts = ["What is 7 times 8?", "Name a colour.", "Write a haiku about the sea."]
    policy = Policy.build(nnx.split(model)[0], tok, PromptConfig.plain(chat=True))
    ids = [policy.encode(t) for t in texts]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = []
    for prompt in ids:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=20,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        refs.append(out[0, len(prompt) :].tolist())
    got = generate(model, tok, texts, max_new_tokens=20, temperature=0.0)
    for ref, texts_i in zip(refs, got, strict=True):
        assert texts_i == [tok.decode(ref, skip_special_tokens=True)]
    params = nnx.split(model)[1]
    # the static reference sampler with the policy's stops (EOS and <|endoftext|>) agrees
    sampler = Sampler(policy.engine.graphdef, stop_token_ids=policy.stop_ids, pad_id=policy.pad_id)
    result = sampler.sample(params, ids, SamplingParams(20, temperature=0.0), jax.random.key(0))
    for i, ref in enumerate(refs):
        assert result.completion(i) == ref, i
    # and so does the engine with prompts of different lengths, more requests than slots
    policy = Policy.build(nnx.split(model)[0], tok, PromptConfig.plain(chat=True), max_slots=2)
    many = ids + [policy.encode("Count from one to ten, please, in words.")]
    out = policy.generate(
        policy.prepare(params), many, SamplingParams(20, temperature=0.0), jax.random.key(0)
    )
    for i, ref in enumerate(refs):
        assert out[i][0].tokens.tolist() == ref, i


# ----------------------------------------------------------------------------- sampling semantics


def test_deterministic_and_logprobs_match_full_forward(llama):
    _, graphdef, params = llama
    sampler = make_sampler(graphdef)
    sampling = SamplingParams(max_new_tokens=20, temperature=1.0, num_samples=G)
    a = sampler.sample(params, PROMPTS, sampling, jax.random.key(3))
    b = sampler.sample(params, PROMPTS, sampling, jax.random.key(3))
    c = sampler.sample(params, PROMPTS, sampling, jax.random.key(4))
    for field in ("tokens", "mask", "logprobs", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.tokens.dtype == np.int32 and a.mask.dtype == bool and a.logprobs.dtype == np.float32
    lp = log_softmax(completion_logits(graphdef, params, PROMPTS, a))[:, :20]
    recomputed = np.take_along_axis(lp, a.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.where(a.mask, recomputed, 0), a.logprobs, atol=1e-4)


def test_stop_tokens_lengths_and_truncation(llama):
    _, graphdef, params = llama
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, num_samples=G)
    free = make_sampler(graphdef, stop_token_ids=[VOCAB - 1]).sample(
        params, PROMPTS, sampling, jax.random.key(11)
    )
    # Stop on a token that row 0 emits at step 3 (and maybe elsewhere), same key, same draws
    # up to each row's stop: the stopped rows are prefixes of the free-running ones.
    stop = int(free.tokens[0, 3])
    res = make_sampler(graphdef, stop_token_ids=[stop]).sample(
        params, PROMPTS, sampling, jax.random.key(11)
    )
    assert free.truncated.all()  # the free run never met its (rare) stop token
    saw_stop = saw_trunc = False
    for row in range(len(res)):
        toks = free.tokens[row].tolist()
        n = toks.index(stop) + 1 if stop in toks else 16
        assert res.lengths[row] == n
        assert res.completion(row) == toks[:n]
        assert res.mask[row].tolist() == [True] * n + [False] * (16 - n)
        assert (res.tokens[row, n:] == PAD).all() and (res.logprobs[row, n:] == 0).all()
        assert bool(res.truncated[row]) == (stop not in toks)
        saw_stop |= stop in toks
        saw_trunc |= stop not in toks
    assert res.lengths[0] <= 4 and saw_stop and saw_trunc


def test_temperature_distribution_and_filters():
    """First-token draws of one batched call follow softmax(logits / T) and the filters."""
    model = tiny_model("llama", seed=5)
    graphdef, params = nnx.split(model)
    prompt = [3, 1, 4, 1, 5]
    ones = jnp.ones((1, len(prompt)), bool)
    logits = np.asarray(_forward(graphdef, params, jnp.asarray([prompt]), ones)[0, -1], np.float64)
    sampler = make_sampler(graphdef, batch_buckets=(1,))
    n = 3000
    for i, (temp, top_p, top_k) in enumerate([(1.0, 1.0, 0), (1.7, 1.0, 0), (1.5, 0.8, 0)]):
        sp = SamplingParams(1, temperature=temp, top_p=top_p, top_k=top_k, num_samples=n)
        res = sampler.sample(params, [prompt], sp, jax.random.key(i))
        assert res.mask.all() and (res.lengths == 1).all()
        scaled = logits / temp
        keep = reference_allowed(scaled.astype(np.float32), top_p, top_k)
        probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
        assert_matches_distribution(res.tokens[:, 0], probs / probs.sum())
    assert sampler.compile_count == 1  # temperature / top-p / top-k are traced, not static


def test_top_p_top_k_only_emit_allowed_tokens(llama):
    _, graphdef, params = llama
    sampler = make_sampler(graphdef)
    off_greedy = 0
    for i, (top_p, top_k) in enumerate([(1.0, 3), (0.6, 0), (0.9, 5)]):
        sp = SamplingParams(20, temperature=1.3, top_p=top_p, top_k=top_k, num_samples=G)
        res = sampler.sample(params, PROMPTS, sp, jax.random.key(20 + i))
        logits = completion_logits(graphdef, params, PROMPTS, res)
        for row in range(len(res)):
            comp = res.completion(row)
            scaled = logits[row] / 1.3
            for j, token in enumerate(comp):
                allowed = reference_allowed(scaled[j], top_p, top_k)
                assert allowed[token], (top_p, top_k, row, j)
                off_greedy += int(token != scaled[j].argmax())
    assert off_greedy >= 10  # really sampling, not collapsed to the argmax


def test_filter_logits_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 300)).astype(np.float32) * np.array(
        [[0.5], [1], [2], [4], [8], [1]]
    )
    logits[5, :10] = logits[5, 10]  # ties at the cut
    logits[5, 50:] = -np.inf  # already excluded tokens stay excluded
    filt = jax.jit(filter_logits)
    for top_p, top_k in [(1.0, 0), (1.0, 1), (1.0, 7), (0.9, 0), (0.3, 0), (0.5, 20), (1.0, 400)]:
        got = np.asarray(filt(jnp.asarray(logits), jnp.float32(top_p), jnp.int32(top_k)))
        for r in range(logits.shape[0]):
            want = reference_allowed(logits[r], top_p, top_k) & np.isfinite(logits[r])
            np.testing.assert_array_equal(np.isfinite(got[r]), want, err_msg=f"{top_p} {top_k} {r}")
            np.testing.assert_array_equal(got[r][want], logits[r][want])


def test_categorical_and_argmax_helpers():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300,)).astype(np.float32) * 1.5
    logits[[0, 130, 299]] = -np.inf  # excluded, in the first, second and (padded) last block
    logits[200:256] = -np.inf  # a whole block of zero mass
    n = 20000
    draws = jax.jit(categorical)(jax.random.key(0), jnp.broadcast_to(logits, (n, 300)))
    probs = np.exp(logits - logits.max())
    assert_matches_distribution(np.asarray(draws), probs / probs.sum())
    x = jnp.asarray([[1.0, 3.0, 3.0, -jnp.inf], [-jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf]])
    np.testing.assert_array_equal(argmax_last(x), [1, 0])


# ----------------------------------------------------------------------------- compilation, mesh


def test_compile_count_within_buckets(llama):
    _, graphdef, params = llama
    sampler = make_sampler(graphdef)
    calls = [  # (prompt lengths, temperature, top_p, top_k, max_new): all in one bucket
        ([3, 9], 0.0, 1.0, 0, 5),
        ([30], 0.7, 0.9, 0, 9),
        ([1, 2, 3, 4], 1.0, 1.0, 4, 12),
        ([17, 32, 5], 1.3, 0.5, 2, 32),
        ([8], 0.2, 1.0, 0, 17),
    ]
    for i, (lengths, temp, top_p, top_k, max_new) in enumerate(calls):
        prompts = [list(range(10, 10 + n)) for n in lengths]
        sp = SamplingParams(max_new, temperature=temp, top_p=top_p, top_k=top_k, num_samples=G)
        res = sampler.sample(params, prompts, sp, jax.random.key(i))
        assert res.tokens.shape == (G * len(prompts), max_new)
        if i == 0:  # 0 when another test already compiled this very program (shared jit cache)
            first = sampler.compile_count
            assert first <= 1
    assert sampler.compile_count == first
    sp = SamplingParams(4, temperature=0.0, num_samples=G)
    sampler.sample(params, [list(range(10, 50))], sp, jax.random.key(0))  # prompt bucket 64
    assert sampler.compile_count == first + 1


def test_mesh_greedy_equals_single_device(llama):
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated CPU devices of conftest.py")
    _, graphdef, params = llama
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0, num_samples=G)
    plain = make_sampler(graphdef).sample(params, PROMPTS, sampling, jax.random.key(0))
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    sharded = jax.device_put(params, shd.param_shardings(params, mesh))
    sampler = make_sampler(graphdef, mesh=mesh)
    out = sampler.sample_device(sharded, PROMPTS, sampling, jax.random.key(0))
    # ROWS (prompts x G) are padded to a multiple of the 8 data shards, not prompts:
    # 3 prompts -> 4 (x G=2 = 8 rows), not 8 prompts (16 rows).
    assert out.tokens.shape[0] == 4 * G
    assert out.tokens.sharding.spec[0] == ("data", "fsdp")
    res = sampler.sample(sharded, PROMPTS, sampling, jax.random.key(0))
    np.testing.assert_array_equal(res.tokens, plain.tokens)
    np.testing.assert_array_equal(res.lengths, plain.lengths)
    np.testing.assert_allclose(res.logprobs, plain.logprobs, atol=1e-4)


# ----------------------------------------------------------------------------- host API, CLI


def test_memory_estimate_and_validation(llama):
    _, graphdef, params = llama
    cfg = config_from_graphdef(graphdef)
    assert cfg == tiny_config("llama")
    sampling = SamplingParams(max_new_tokens=40, num_samples=4)
    est = make_sampler(graphdef, batch_buckets=(1, 2, 4, 8)).memory_estimate(3, 20, sampling)
    # 3 prompts -> batch 4, 16 rows; prompt bucket 32 + new-token bucket 64 = 96 slots;
    # keys and values: 2 * layers * rows * slots * kv_heads * head_dim * 4 bytes.
    assert (est["batch"], est["rows"], est["cache_len"]) == (4, 16, 96)
    assert est["kv_cache_bytes"] == 2 * 2 * 16 * 96 * 2 * 8 * 4 == cache_bytes(cfg, 16, 96)
    half = make_sampler(graphdef, cache_dtype="bfloat16", batch_buckets=(1, 2, 4, 8))
    assert half.memory_estimate(3, 20, sampling)["kv_cache_bytes"] * 2 == est["kv_cache_bytes"]
    mesh_sampler = make_sampler(graphdef, mesh=shd.make_mesh(None), batch_buckets=(1, 2, 4))
    # 3 prompts x G=4 on 8 devices: 4 prompts = 16 rows, a multiple of 8 (not 8 prompts).
    assert mesh_sampler.memory_estimate(3, 20, sampling)["batch"] == 4
    one = dataclasses.replace(sampling, num_samples=1)
    assert mesh_sampler.memory_estimate(3, 20, one)["batch"] == 8  # G=1: 8 rows

    sampler = make_sampler(graphdef, max_prompt_len=4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.sample(params, [[1], []], SamplingParams(4), key)
    with pytest.raises(ValueError, match="prompt 0 has token ids"):
        sampler.sample(params, [[1, VOCAB]], SamplingParams(4), key)
    with pytest.raises(ValueError, match="top_p"):
        sampler.sample(params, [[1]], SamplingParams(4, top_p=0.0), key)
    with pytest.raises(ValueError, match="stop/pad token id"):
        make_sampler(graphdef, stop_token_ids=[VOCAB])
    # Left truncation keeps the prompt's end: same greedy output as the cut prompt.
    sp = SamplingParams(6, temperature=0.0, num_samples=G)
    cut = sampler.sample(params, [list(range(20, 30))], sp, key)
    assert sampler.num_truncated_prompts == 1
    ref = make_sampler(graphdef).sample(params, [list(range(26, 30))], sp, key)
    np.testing.assert_array_equal(cut.tokens, ref.tokens)


def test_cli_rejects_missing_prompt():
    proc = subprocess.run(
        [sys.executable, "-m", "meljax.commands.sample", "--config.model.path=demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--prompt" in proc.stderr


def test_cli_rejects_bad_flags():
    proc = subprocess.run(
        [sys.executable, "-m", "meljax.commands.sample", "--prompt=x", "--config.rollout.top_p=0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "rollout.top_p=0.0 must be at least" in proc.stderr


@pytest.mark.slow
def test_sample_command_prints_completions_and_memory():
    """The ``meljax sample`` work function (the flags module only parses and calls it)."""
    from meljax.config.settings import base_config
    from meljax.sampling.generate import sample_model

    cfg = base_config()  # model.path: demo
    cfg.data.instruction = "none"  # the prompts as typed, in the chat template
    cfg.rollout.max_new_tokens = 6
    cfg.rollout.temperature = 0.0
    lines: list[str] = []
    # Three chat prompts with one sample each, as typed.
    texts = ["What is 7 times 8?", "Hi", "Name a colour."]
    out = sample_model(cfg, texts, echo=lines.append)
    printed = "\n".join(lines)
    assert len(out) == 3 and all(len(x) == 1 and x[0] for x in out)
    assert "=== prompt 1: Hi" in printed and "--- sample 0 (6 tokens" in printed
    # The config's mesh (mesh.fsdp=-1: the 8 test devices) decodes on data=8, one slot per
    # shard: 3 samples -> 8 slots; prompt bucket 64 + 6 new tokens = 70 cache slots:
    # 2 * 30 layers * 8 slots * 70 * 3 kv heads * 64 dims * 4 bytes = 24.6 MiB, 3.1 per device.
    assert (
        "engine: 8 decode slots x 70 cache slots (float32), KV pool 3.1 MiB per device" in printed
    )
    assert "decode mesh data=8" in printed


def test_greedy_unchanged_with_chunked_attention_prefill_and_scanned_layers(llama, monkeypatch):
    """The decode path variants give the same greedy tokens as the default (CPU: split layers,
    one-shot prefill, dense attention): blockwise attention, a prompt prefilled 4 tokens at a
    time, and the layers scanned over a stacked cache."""
    model, graphdef, params = llama
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0, num_samples=G)
    plain = make_sampler(graphdef).sample(params, PROMPTS, sampling, jax.random.key(0))
    cfg = model.cfg.replace(attention_impl="chunked", attention_block_size=8, prefill_chunk_size=4)
    other = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]
    import tests.reference_sampler as sampler_module

    monkeypatch.setattr(sampler_module, "prefer_split_layers", lambda: False)
    res = make_sampler(other).sample(params, PROMPTS, sampling, jax.random.key(0))
    np.testing.assert_array_equal(res.tokens, plain.tokens)
    np.testing.assert_array_equal(res.lengths, plain.lengths)
    np.testing.assert_allclose(res.logprobs, plain.logprobs, atol=1e-5)
