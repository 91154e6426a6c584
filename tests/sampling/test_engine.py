"""The continuous-batching engine (``meljax.sampling.ContinuousEngine``) against the static
reference sampler, Hugging Face ``generate``, a recomputed forward pass and hand-computed
counters; per-request determinism whatever the pool; the sharded mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meljax.runtime import sharding as shd
from meljax.sampling import ContinuousEngine, Request, SamplingParams, filter_logits, schedule
from meljax.sampling.schedule import Part
from tests.sampling.test_sampling import (
    PAD,
    STOP,
    _forward,
    assert_matches_distribution,
    log_softmax,
    make_sampler,
    reference_allowed,
    tiny_model,
)

# very different lengths: prompt buckets 32 and 64 in one call, a one-token prompt
PROMPTS = [[5, 6, 10, 11], list(range(20, 60)), [20], list(range(8, 19)), [3, 1, 4, 1, 5, 9]]


def engine(graphdef, **kw) -> ContinuousEngine:
    kw.setdefault("stop_token_ids", [STOP])
    kw.setdefault("pad_id", PAD)
    return ContinuousEngine(graphdef, **kw)


def requests(prompts, sampling):
    return [Request(tuple(p), sampling) for p in prompts]


@pytest.fixture(scope="module")
def llama():
    return nnx.split(tiny_model("llama"))


def test_greedy_matches_static_sampler_and_transformers(tmp_path):
    """Greedy: token-for-token the reference sampler and HF ``generate`` (llama, qwen2, qwen3),
    prompts of 1 to 40 tokens in one call, 5 requests x G=2 through 4 slots."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from meljax.models import save_pretrained

    sampling = SamplingParams(max_new_tokens=20, temperature=0.0, num_samples=2)
    for model_type in ("llama", "qwen2", "qwen3"):
        model = tiny_model(model_type)
        graphdef, params = nnx.split(model)
        out = engine(graphdef, max_slots=4, segment_steps=6, kv_buckets=(32, 64)).generate(
            params, requests(PROMPTS, sampling), jax.random.key(0)
        )
        ref = make_sampler(graphdef, batch_buckets=(8,)).sample(
            params, PROMPTS, sampling, jax.random.key(0)
        )
        path = tmp_path / model_type
        save_pretrained(model, str(path))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        for i, prompt in enumerate(PROMPTS):
            with torch.no_grad():
                seq = (
                    hf.eval()
                    .generate(
                        torch.tensor([prompt]),
                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        max_new_tokens=20,
                        do_sample=False,
                        eos_token_id=STOP,
                        pad_token_id=PAD,
                    )[0, len(prompt) :]
                    .tolist()
                )
            if STOP in seq:
                seq = seq[: seq.index(STOP) + 1]
            for g in range(2):
                got = out[i][g]
                assert got.tokens.tolist() == ref.completion(2 * i + g) == seq, (model_type, i)
                assert got.truncated == bool(ref.truncated[2 * i + g]) == (STOP not in seq)
                n = len(seq)
                np.testing.assert_allclose(got.logprobs, ref.logprobs[2 * i + g, :n], atol=1e-4)


def test_output_independent_of_pool_and_segments_and_logprobs_match_forward(llama):
    """Same key: the same tokens whatever the slot count, the segment length and the mix of
    requests (greedy and sampled, different controls, share the pool); log-probs equal a
    recomputed forward pass (log_softmax of the raw logits)."""
    graphdef, params = llama
    mixed = [
        Request(tuple(PROMPTS[0]), SamplingParams(16, temperature=1.0, num_samples=3)),
        Request(tuple(PROMPTS[1]), SamplingParams(12, temperature=0.0, num_samples=1)),
        Request(tuple(PROMPTS[2]), SamplingParams(16, 1.3, top_p=0.8, num_samples=2)),
        Request(tuple(PROMPTS[3]), SamplingParams(9, 0.9, top_k=5, num_samples=2)),
    ]
    key = jax.random.key(7)
    runs = [  # with attended-length buckets and without (the CPU default); the cache
        # written in the loop (the CPU default) and read-only next to a segment buffer
        engine(graphdef, max_slots=s, segment_steps=k, kv_buckets=b, segment_buffer=buf).generate(
            params, mixed, key
        )
        for s, k, b, buf in (
            (2, 3, (32, 64), True),
            (8, 16, None, None),
            (16, 1, (16, 32, 64), False),
            (3, 5, None, True),
        )
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x.tokens, y.tokens)
                np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
                assert x.truncated == y.truncated
    # alone in the pool (as request 2 of its own list), a request draws what it drew among
    # the others; the key depends on the request index, not on the neighbours
    alone = engine(graphdef, max_slots=4).generate(params, [mixed[0], mixed[0], mixed[2]], key)
    for x, y in zip(alone[2], runs[0][2], strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
    assert not np.array_equal(runs[0][0][0].tokens, runs[0][0][1].tokens)  # samples differ
    assert (
        runs[0][1][0].tokens.tolist()
        == engine(graphdef).generate(params, [mixed[1]], jax.random.key(99))[0][0].tokens.tolist()
    )  # greedy: the key does not matter
    # log-probs: one cache-free forward over prompt + completion
    for req, group in zip(mixed, runs[0], strict=True):
        for gen in group:
            seq = np.asarray([*req.prompt_ids, *gen.tokens.tolist()], np.int32)[None]
            mask = jnp.ones(seq.shape, bool)
            logits = np.asarray(_forward(graphdef, params, jnp.asarray(seq), mask))[0]
            n, p = len(gen.tokens), len(req.prompt_ids)
            lp = log_softmax(logits[p - 1 : p - 1 + n])
            want = lp[np.arange(n), gen.tokens]
            np.testing.assert_allclose(gen.logprobs, want, atol=1e-4)
            assert gen.truncated == (STOP not in gen.tokens.tolist())
            assert len(gen.tokens) <= req.sampling.max_new_tokens
            if not gen.truncated:
                assert gen.tokens.tolist().index(STOP) == n - 1


@pytest.mark.parametrize("split", [False, True])
def test_tpu_cache_layout_gives_the_same_generations(llama, split):
    """The TPU / GPU cache layout (``hd_minor``, forced here on CPU) with the layer-scanned
    stacked cache of a TPU and the split one of a CPU: the same tokens and log-probs as the
    CPU layout, through segments that merge their buffer into the cache and refills."""
    from meljax.models import kv_cache

    graphdef, params = llama
    reqs = [
        Request(tuple(PROMPTS[1]), SamplingParams(14, temperature=1.0, num_samples=2)),
        Request(tuple(PROMPTS[0]), SamplingParams(10, temperature=0.0, num_samples=1)),
        Request(tuple(PROMPTS[4]), SamplingParams(12, 0.8, top_p=0.9, num_samples=2)),
    ]
    runs = []
    for layout in ("heads", "hd_minor"):
        with kv_cache.use_layout(layout):
            eng = engine(
                graphdef, max_slots=3, segment_steps=4, kv_buckets=(32, 64), segment_buffer=True
            )
            eng.split = split
            runs.append(eng.generate(params, reqs, jax.random.key(3)))
    for a, b in zip(*runs, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.tokens, y.tokens)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


@pytest.mark.parametrize("segment_buffer", [True, False])
@pytest.mark.parametrize("shrink_tail", [False, True])
def test_slot_utilisation_hand_computed(llama, segment_buffer, shrink_tail):
    """3 requests of 4, 12 and 2 tokens (no stop id), 2 slots, segments of 2 steps:
    A, B start; after 2 segments A (4) is done and C takes its slot; C ends after segment 3,
    B after segment 6: 6 segments x 2 steps x 2 slots = 24 slot-steps, 18 useful tokens.
    With ``shrink_tail``, B (6 tokens left) runs segments 4-6 alone in a pool of 1 slot:
    3 x 2 x 2 + 3 x 2 x 1 = 18 slot-steps."""
    graphdef, params = llama
    eng = engine(
        graphdef,
        stop_token_ids=[],
        max_slots=2,
        segment_steps=2,
        kv_buckets=(8, 16),
        segment_buffer=segment_buffer,
        shrink_tail=shrink_tail,
    )
    reqs = [Request((5, 6, 7), SamplingParams(n, temperature=1.0)) for n in (4, 12, 2)]
    out = eng.generate(params, reqs, jax.random.key(0))
    assert [len(g[0].tokens) for g in out] == [4, 12, 2]
    assert all(g[0].truncated for g in out)
    s = eng.last_stats
    assert (s.slots, s.segments, s.prefills) == (2, 6, 2)
    steps = 18 if shrink_tail else 24
    assert (s.useful_tokens, s.slot_steps) == (18, steps)
    assert s.slot_utilisation == pytest.approx(18 / steps)
    assert s.pools == ({2: 3, 1: 3} if shrink_tail else {2: 6})
    # attended length: the bucket of the longest live slot's position at the segment start
    # (prompt 3 - 1 + B's tokens so far: 2, 4, ..., 12) -> with a segment buffer (which holds
    # the segment's own tokens) buckets 8, 8, 8, 8, 16, 16; writing the cache in the loop,
    # the segment's 2 slots too: 4, 6, ..., 14 -> 8, 8, 8, 16, 16, 16 (the cache holds
    # 32 + 12 slots)
    want = {8: 4, 16: 2} if segment_buffer else {8: 3, 16: 3}
    assert s.kv_lens == want and s.cache_len == 44


def test_tail_shrinks_the_pool_and_changes_no_output(llama):
    """Samples of very different lengths in 8 slots: once the queue is empty, the live ones
    move into pools of 4, 2 and 1 slots (rows gathered mid-sample, free slots padded); the
    tokens, log-probs and flags equal those of the pool that never shrinks."""
    graphdef, params = llama
    reqs = [
        Request(tuple(PROMPTS[1]), SamplingParams(30, temperature=1.0, num_samples=3)),
        Request(tuple(PROMPTS[0]), SamplingParams(5, temperature=0.0, num_samples=1)),
        Request(tuple(PROMPTS[4]), SamplingParams(12, 0.8, top_p=0.9, num_samples=4)),
        Request(tuple(PROMPTS[3]), SamplingParams(3, temperature=1.0, num_samples=2)),
    ]
    key = jax.random.key(11)
    runs, stats = [], []
    for shrink in (False, True):
        eng = engine(graphdef, stop_token_ids=[], max_slots=8, segment_steps=2, shrink_tail=shrink)
        runs.append(eng.generate(params, reqs, key))
        stats.append(eng.last_stats)
    for a, b in zip(*runs, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.tokens, y.tokens)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
            assert x.truncated == y.truncated
    # 10 samples: 8 start, the 2 of request 3 wait for free slots; then only the 3 of
    # request 0 (30 tokens) outlive the rest: 8 -> 4 slots, later fewer
    assert set(stats[0].pools) == {8}
    assert {8, 4} <= set(stats[1].pools)
    assert stats[1].useful_tokens == stats[0].useful_tokens
    assert stats[1].slot_steps < stats[0].slot_steps


def test_a_request_split_over_refills_is_prefilled_once(llama):
    """3 slots, segments of 2 steps, no stop id: A (1 sample of 4 tokens) and B (3 samples of
    8). A and 2 samples of B start (one prefill); after segment 2, B's third sample takes A's
    slot from the kept prompt cache (no second prefill); after segment 4 it has 4 tokens left
    and runs alone in a pool of 1: 4 x 2 x 3 + 2 x 2 x 1 = 28 slot-steps for 28 tokens. The
    tokens equal those of a pool that holds everything at once."""
    graphdef, params = llama
    reqs = [
        Request((5, 6, 7), SamplingParams(4, temperature=1.0)),
        Request(tuple(PROMPTS[1]), SamplingParams(8, temperature=1.0, num_samples=3)),
    ]
    key = jax.random.key(5)
    eng = engine(graphdef, stop_token_ids=[], max_slots=3, segment_steps=2, shrink_tail=True)
    out = eng.generate(params, reqs, key)
    s = eng.last_stats
    assert (s.prefills, s.segments, s.useful_tokens, s.slot_steps) == (1, 6, 28, 28)
    assert s.pools == {3: 4, 1: 2}
    # 2 slots: B's samples enter one at a time (split parts, then its second part), all
    # copied from the one prefill
    narrow = engine(graphdef, stop_token_ids=[], max_slots=2, segment_steps=2)
    out_narrow = narrow.generate(params, reqs, key)
    assert narrow.last_stats.prefills == 1
    whole = engine(graphdef, stop_token_ids=[], max_slots=8).generate(params, reqs, key)
    for a, b, c in zip(out, whole, out_narrow, strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            np.testing.assert_array_equal(x.tokens, y.tokens)
            np.testing.assert_array_equal(z.tokens, y.tokens)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


def test_schedule_admit_and_shrink_plan_hand_computed():
    queue = [Part(0, 0, 3), Part(1, 0, 8), Part(2, 0, 2)]
    # whole parts only: the 8 waits, the 2 behind it passes
    assert schedule.admit(queue, 6, split=False) == ([queue[0], queue[2]], [queue[1]])
    # split: the 8 fills the room, its rest stays at the head
    assert schedule.admit(queue, 6, split=True) == (
        [queue[0], Part(1, 0, 3)],
        [Part(1, 3, 5), queue[2]],
    )
    # 2 devices x 4 slots, live 1 | 6, 7: each device keeps its own, blocks of 2 (padding
    # names a slot of the same device and is not kept)
    src, keep = schedule.shrink_plan([1, 6, 7], 8, 2, (1, 2, 4, 8))
    assert src.tolist() == [1, 0, 6, 7] and keep.tolist() == [True, False, True, True]
    assert schedule.shrink_plan([0, 1, 2, 5, 6], 8, 1, (1, 2, 4, 8)) is None  # 8 of 8
    src, keep = schedule.shrink_plan([3], 8, 1, (1, 2, 4, 8))
    assert src.tolist() == [3] and keep.tolist() == [True]


def test_per_row_controls_follow_their_distributions():
    """First-token draws of two requests with different temperature / top-p / top-k sharing
    one pool follow softmax(filter(logits / T)) each (chi-square at the 0.999 level)."""
    graphdef, params = nnx.split(tiny_model("llama", seed=5))
    prompt = [3, 1, 4, 1, 5]
    ones = jnp.ones((1, len(prompt)), bool)
    logits = np.asarray(_forward(graphdef, params, jnp.asarray([prompt]), ones)[0, -1], np.float64)
    cases = [(1.7, 1.0, 0), (1.5, 0.8, 0), (1.0, 1.0, 6)]
    reqs = [
        Request(tuple(prompt), SamplingParams(1, t, top_p=p, top_k=k, num_samples=2000))
        for t, p, k in cases
    ]
    out = engine(graphdef, max_slots=1024).generate(params, reqs, jax.random.key(1))
    for (temp, top_p, top_k), group in zip(cases, out, strict=True):
        draws = np.asarray([g.tokens[0] for g in group])
        scaled = logits / temp
        keep = reference_allowed(scaled.astype(np.float32), top_p, top_k)
        probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
        assert_matches_distribution(draws, probs / probs.sum())


def test_filter_logits_per_row_equals_scalar_calls():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, 300)).astype(np.float32) * 2)
    top_p = jnp.asarray([1.0, 0.5, 0.9, 1.0], jnp.float32)
    top_k = jnp.asarray([0, 0, 7, 3], jnp.int32)
    rows = np.asarray(jax.jit(filter_logits)(logits, top_p, top_k))
    for r in range(4):
        one = np.asarray(filter_logits(logits[r : r + 1], top_p[r], top_k[r]))[0]
        np.testing.assert_array_equal(rows[r], one)


def test_mesh_equals_single_device_and_weights_replicated(llama):
    """Rows over 8 (then 4) devices, one or two slots each: prompts whose samples span
    devices are prefilled on each, every slot copy stays on its device, and so does the
    tail's move into a smaller pool."""
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated CPU devices of conftest.py")
    graphdef, params = llama
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    sharded = jax.device_put(params, shd.param_shardings(params, mesh))
    reqs = [
        Request(tuple(PROMPTS[0]), SamplingParams(24, temperature=1.0, num_samples=1)),
        Request(tuple(PROMPTS[1]), SamplingParams(4, temperature=0.0, num_samples=1)),
        Request(tuple(PROMPTS[4]), SamplingParams(24, temperature=0.8, num_samples=1)),
        Request(tuple(PROMPTS[3]), SamplingParams(4, temperature=1.0, num_samples=1)),
        Request(tuple(PROMPTS[2]), SamplingParams(6, temperature=1.0, num_samples=4)),
        Request(tuple(PROMPTS[0]), SamplingParams(6, temperature=0.8, num_samples=3)),
    ]  # 11 samples through 8 slots: refills land on scattered free slots
    key = jax.random.key(3)
    plain = engine(graphdef, max_slots=8, segment_steps=2).generate(params, reqs, key)
    for tp in (1, 2):
        eng = engine(graphdef, mesh=mesh, max_slots=8, segment_steps=2, tensor_parallel=tp)
        weights = eng.prepare(sharded)
        # the inference layout: nothing over fsdp, so no decode step gathers weight shards
        for x in jax.tree.leaves((weights.state, weights.layers)):
            assert "fsdp" not in str(x.sharding.spec)
        out = eng.generate(weights, reqs, key)
        assert eng.last_stats.slots == 8
        # the tail: samples 0 and 2 outlive the rest, one per device at tp=2 (2 slots per
        # device): the pool shrinks to 4 slots there; at tp=1 each device holds 1 slot
        assert set(eng.last_stats.pools) == ({8} if tp == 1 else {8, 4})
        for a, b in zip(plain, out, strict=True):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x.tokens, y.tokens)
                np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)


def test_pool_sizing_budget_and_validation(llama):
    graphdef, params = llama
    from meljax.models import cache_bytes

    cfg = engine(graphdef).config
    eng = engine(graphdef, max_slots=64)
    # 10 samples: a pool of bucket(10) = 16 slots (never more than the call needs), cache =
    # prompt bucket 32 + 24 new
    assert eng.pool_shape(10, 20, 24) == (16, 56)
    assert eng.pool_shape(500, 20, 24) == (64, 56)
    per_slot = cache_bytes(cfg, 1, 56)
    budget = engine(graphdef, max_slots=64, kv_budget_gib=5.5 * per_slot / 2**30)
    assert budget.pool_shape(500, 20, 24) == (5, 56)
    assert "5 decode slots x 56 cache slots" in budget.describe(500, 20, 24)
    with pytest.raises(ValueError, match="holds no slot"):
        engine(graphdef, kv_budget_gib=0.5 * per_slot / 2**30).pool_shape(4, 20, 24)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate(params, requests([[1], []], SamplingParams(4)), key)
    with pytest.raises(ValueError, match="outside"):
        eng.generate(params, requests([[1, 10**6]], SamplingParams(4)), key)
    cut = engine(graphdef, max_prompt_len=4)
    greedy = SamplingParams(6, temperature=0.0)
    a = cut.generate(params, requests([list(range(20, 30))], greedy), key)
    b = eng.generate(params, requests([list(range(26, 30))], greedy), key)
    assert cut.num_truncated_prompts == 1
    np.testing.assert_array_equal(a[0][0].tokens, b[0][0].tokens)
