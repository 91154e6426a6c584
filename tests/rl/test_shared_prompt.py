"""Shared-prompt updates (``meljax.rl.shared_prompt``): the same numbers as the flat batch."""

import dataclasses
import importlib

import jax
import numpy as np
import optax
import pytest

from meljax.rl import objective as losses
from meljax.rl import update as ts
from meljax.rl.batch import TrainBatch, build_policy_batch, build_sequence_batch
from meljax.rl.logprobs import sequence_logprobs
from meljax.rl.shared_prompt import (
    GroupedPolicyBatch,
    group_policy_batch,
    shared_logprobs,
    ungroup_per_token,
)
from meljax.runtime import sharding as shd
from tests.conftest import small_llama_params

VOCAB = 61
G = 3
PROMPT_LENGTHS = (5, 11, 3, 7, 20, 2)  # six groups, different real lengths (buckets 32)


@pytest.fixture(scope="module")
def model_parts():
    return small_llama_params(VOCAB, seed=3)


def _flat_batch(groups=PROMPT_LENGTHS, g=G, seed=0, batch_multiple=1):
    rng = np.random.default_rng(seed)
    prompts, comps = [], []
    for n in groups:
        p = [int(x) for x in rng.integers(1, VOCAB, n)]
        for _ in range(g):
            prompts.append(p)
            comps.append([int(x) for x in rng.integers(1, VOCAB, rng.integers(1, 9))])
    rows = len(prompts)
    pol = build_policy_batch(
        prompts,
        comps,
        advantages=rng.normal(size=rows),
        rewards=rng.integers(0, 2, rows),
        group_index=[i // g for i in range(rows)],
        old_logprobs=[list(rng.normal(-3.0, 0.3, len(c))) for c in comps],
        max_len=32 + 8,
        batch_multiple=batch_multiple,
    )
    ref = np.where(pol.seq.loss_mask > 0, rng.normal(-3.0, 0.3, pol.seq.tokens.shape), 0.0)
    return pol.replace(ref_logprobs=ref.astype(np.float32))


def _mel():
    return build_sequence_batch([[1, 2, 3]], [[4, 5]], min_rows=8, batch_multiple=8, max_len=32)


def test_grouping_layout_and_padding_groups():
    flat = _flat_batch()
    grouped = group_policy_batch(flat, G, batch_multiple=4)
    p, g, la = grouped.answers.seq.tokens.shape
    assert (p, g) == (8, G) and grouped.prompt_tokens.shape == (8, 32) and la == 8
    assert list(grouped.prompt_lengths) == [*PROMPT_LENGTHS, 0, 0]  # two padding groups
    assert (
        not grouped.answers.seq.weight[6:].any() and (grouped.answers.group_index[6:] == -1).all()
    )
    # per-token arrays go back to the flat columns unchanged
    back = ungroup_per_token(grouped, grouped.answers.old_logprobs, flat.seq.tokens.shape)
    np.testing.assert_array_equal(back, flat.old_logprobs)
    flat_answers = grouped.flat_answers()
    assert flat_answers.seq.tokens.shape == (8 * G, la)
    np.testing.assert_array_equal(
        flat_answers.seq.loss_mask.sum(), np.asarray(flat.seq.loss_mask).sum()
    )


def test_ungroupable_batches_give_none():
    flat = _flat_batch()
    # a group of G - 1 answers
    short = jax.tree.map(lambda x: x[1:], flat)
    assert group_policy_batch(short, G) is None
    # rows of one group with different prompts
    bad = flat.replace(seq=flat.seq.replace(tokens=flat.seq.tokens.copy()))
    bad.seq.tokens[1, 0] += 1
    assert group_policy_batch(bad, G) is None
    # groups out of order
    perm = np.arange(flat.seq.tokens.shape[0])
    perm[[0, 3]] = perm[[3, 0]]
    assert group_policy_batch(jax.tree.map(lambda x: x[perm], flat), G) is None


def test_shared_logprobs_equal_the_flat_ones(model_parts):
    graphdef, params = model_parts
    flat = _flat_batch()
    grouped = group_policy_batch(flat, G, batch_multiple=4)
    want, want_ent = sequence_logprobs((graphdef, params), flat.seq, chunk_size=16)
    got, got_ent = shared_logprobs((graphdef, params), grouped, chunk_size=4)
    shape = grouped.answers.seq.tokens.shape
    mask = np.asarray(flat.seq.loss_mask) > 0
    for w, x in ((want, got), (want_ent, got_ent)):
        back = ungroup_per_token(grouped, np.asarray(x).reshape(shape), mask.shape)
        np.testing.assert_allclose(back[mask], np.asarray(w)[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mesh_axes", [None, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_logprob_passes_equal_the_flat_ones(model_parts, mesh_axes):
    """The old / reference log-prob pass (``make_compute_logprobs``), one device and sharded."""
    graphdef, params = model_parts
    flat = _flat_batch(batch_multiple=8)
    want = ts.make_compute_logprobs(graphdef, chunk_size=16)(params, flat.seq)
    mesh = None if mesh_axes is None else shd.make_mesh(mesh_axes)
    dp = 1 if mesh is None else shd.data_parallel_size(mesh)
    grouped = group_policy_batch(flat, G, batch_multiple=2 * dp)
    compute = ts.make_compute_logprobs(graphdef, mesh=mesh, chunk_size=4, num_microbatches=2)
    state = ts.init_train_state(params, optax.sgd(1.0), mesh)
    got = compute(state, grouped)
    assert got.shape == grouped.answers.seq.tokens.shape
    back = ungroup_per_token(grouped, got, want.shape)
    np.testing.assert_allclose(back, np.asarray(want), atol=1e-5)


def _step_pair(model_parts, cfg, mesh_axes, micro):
    """``(flat, grouped)`` results of one SGD(lr=1) step: new params = params - gradient."""
    graphdef, params = model_parts
    mesh = None if mesh_axes is None else shd.make_mesh(mesh_axes)
    dp = 1 if mesh is None else shd.data_parallel_size(mesh)
    flat = _flat_batch(batch_multiple=8)
    grouped = group_policy_batch(flat, G, batch_multiple=dp * micro)
    assert isinstance(grouped, GroupedPolicyBatch)
    opt = optax.sgd(1.0)
    out = []
    for policy in (flat, grouped):
        step = ts.make_train_step(
            graphdef, opt, cfg, mesh=mesh, num_microbatches=micro, donate=False
        )
        state = ts.init_train_state(params, opt, mesh)
        new, metrics = step(state, TrainBatch(policy, _mel()))
        out.append((jax.tree.map(np.asarray, new.params), jax.tree.map(np.asarray, metrics)))
    return params, out


CASES = [
    (losses.LossConfig(use_mel=False, logprob_chunk=4), None, 1),
    (losses.LossConfig(use_mel=False, kl_beta=0.1, logprob_chunk=8), None, 2),
    (losses.LossConfig(use_mel=True, aggregation="token_mean", logprob_chunk=8), None, 4),
    (losses.LossConfig(use_mel=False, kl_beta=0.1), {"data": 2, "fsdp": 4}, 1),
    (losses.LossConfig(use_mel=True, logprob_chunk=8), {"data": 2, "fsdp": 2, "tensor": 2}, 2),
]


@pytest.mark.parametrize(("cfg", "mesh_axes", "micro"), CASES)
def test_loss_and_gradients_equal_the_flat_ones(model_parts, cfg, mesh_axes, micro):
    params, ((p_flat, m_flat), (p_sh, m_sh)) = _step_pair(model_parts, cfg, mesh_axes, micro)
    for k, v in m_flat.items():
        np.testing.assert_allclose(m_sh[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(m_flat["grad_norm"]) > 1e-3 and float(m_flat["policy_loss"]) != 0.0
    scale = float(m_flat["grad_norm"])
    for a, b, p0 in zip(*map(jax.tree.leaves, (p_flat, p_sh, params)), strict=True):
        g_flat, g_sh = np.asarray(p0) - a, np.asarray(p0) - b  # the gradients
        np.testing.assert_allclose(g_sh, g_flat, atol=1e-5 * scale, rtol=1e-4)


def test_train_on_batch_recompute_equals_the_flat_batch(model_parts):
    """``old_logprobs="recompute"`` and two passes: the grouped batch's old log-probs come from
    the shared pass, and both updates match the flat batch's."""
    graphdef, params = model_parts
    cfg = losses.LossConfig(use_mel=False, logprob_chunk=8)
    flat = _flat_batch()
    grouped = group_policy_batch(flat, G, batch_multiple=2)
    opt = optax.adam(1e-2)
    step = ts.make_train_step(graphdef, opt, cfg, num_microbatches=2, donate=False)
    compute = ts.make_compute_logprobs(graphdef, chunk_size=8)
    results = []
    for policy in (flat, grouped):
        state, metrics = ts.train_on_batch(
            ts.init_train_state(params, opt),
            TrainBatch(policy, build_sequence_batch([], [], max_len=32)),
            step,
            num_passes=2,
            old_logprobs="recompute",
            compute_logprobs=compute,
        )
        results.append((state.params, metrics))
    (pa, ma), (pb, mb) = results
    assert float(ma[0]["approx_kl"]) < 1e-10 and float(mb[0]["approx_kl"]) < 1e-10
    for x, y in zip(ma, mb, strict=True):
        np.testing.assert_allclose(y["loss"], x["loss"], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_a_training_step_with_share_prompt_equals_without(tmp_path):
    """The tiny config through build_run / step: the same rollouts, the same update."""
    from meljax.trainer.run import build_run, step

    cfg = importlib.import_module("meljax.configs.tiny").get_config()
    cfg.unlock()
    cfg.mel.enabled = False
    cfg.rollout.num_questions = 8  # one group per device of the 8: grouping pads no rows
    cfg.algorithm.kl_beta = 0.05
    cfg.algorithm.old_logprobs = "recompute"
    cfg.lock()
    run = build_run(cfg, str(tmp_path), donate=False)
    try:
        s = run.settings
        assert s.update.share_prompt
        off = dataclasses.replace(
            run,
            settings=dataclasses.replace(
                s, update=dataclasses.replace(s.update, share_prompt=False)
            ),
        )
        problems = next(run.data_iter)
        key = jax.random.key(7)
        results = [step(r, run.state, problems, key, 1) for r in (run, off)]
    finally:
        run.close()
    (st_on, rec_on), (st_off, rec_off) = results
    assert rec_on.metrics["train/shared_prompt"] == 1.0
    assert "train/shared_prompt" not in rec_off.metrics
    assert rec_on.metrics["reward_mean"] == rec_off.metrics["reward_mean"]
    for k in ("train/loss", "train/grad_norm", "train/kl_ref", "train/policy_loss"):
        np.testing.assert_allclose(rec_on.metrics[k], rec_off.metrics[k], rtol=1e-5, atol=1e-7)
    # Adam divides each gradient coordinate by its own magnitude: a coordinate whose gradient is
    # near 0 (an embedding row of a rare token) moves by up to lr on f32 rounding alone, so the
    # weights are compared to a fraction of the step size (lr = 1e-3), the gradients above.
    lr = 1e-3
    for a, b in zip(jax.tree.leaves(st_on.params), jax.tree.leaves(st_off.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05 * lr)
