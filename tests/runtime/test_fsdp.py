"""True FSDP on the 8 simulated CPU devices: activations row-sharded, per-device memory and the
compiled collectives (``meljax.plan.hlo``), tensor parallelism still exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from meljax.models import ModelConfig, Transformer
from meljax.plan import hlo
from meljax.rl import objective as losses
from meljax.rl import update as ts
from meljax.rl.batch import PolicyBatch, SequenceBatch, TrainBatch
from meljax.runtime import sharding as shd

# Distinct sizes, so an activation's shape cannot be mistaken for a weight's.
CFG = ModelConfig(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=192,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
ROWS, T, CHUNK = 16, 96, 32

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices")


def abstract_inputs(rows=ROWS, t=T, mel_rows=8):
    graphdef, params = nnx.split(
        nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))), nnx.Param
    )
    opt = optax.adamw(1e-3)

    def init(p):
        zero = jnp.zeros((), jnp.int32)
        return ts.TrainState(step=zero, params=p, opt_state=opt.init(p), skipped_steps=zero)

    s = jax.ShapeDtypeStruct

    def seq(r):
        return SequenceBatch(
            tokens=s((r, t), jnp.int32),
            kv_mask=s((r, t), jnp.bool_),
            positions=s((r, t), jnp.int32),
            loss_mask=s((r, t), jnp.float32),
            weight=s((r,), jnp.float32),
        )

    policy = PolicyBatch(
        seq=seq(rows),
        advantages=s((rows,), jnp.float32),
        old_logprobs=s((rows, t), jnp.float32),
        ref_logprobs=s((rows, t), jnp.float32),
        rewards=s((rows,), jnp.float32),
        group_index=s((rows,), jnp.int32),
    )
    return graphdef, opt, jax.eval_shape(init, params), TrainBatch(policy, seq(mel_rows))


def compile_programs(mesh):
    graphdef, opt, state, batch = abstract_inputs()
    loss_cfg = losses.LossConfig(logprob_chunk=CHUNK)
    update = ts.make_train_step(graphdef, opt, loss_cfg, mesh=mesh).lower(state, batch).compile()
    logprobs = ts.make_compute_logprobs(graphdef, mesh=mesh, chunk_size=CHUNK)
    logprobs = logprobs.lower(state.params, batch.policy.seq).compile()
    return update, logprobs


def activation_all_reduces(text: str) -> list:
    """All-reduces of an activation-shaped array: ``[rows, T, d_model]``, ``[rows, T, d_ff]``,
    ``[rows, chunk, vocab]`` (any row count; also with heads split out)."""
    d, f, v = CFG.hidden_size, CFG.intermediate_size, CFG.vocab_size
    found = []
    for c in hlo.collectives(text):
        if c.kind != "all-reduce":
            continue
        for _, dims in c.shapes:
            if (T in dims and (d in dims or f in dims or CFG.head_dim in dims)) or (
                CHUNK in dims and v in dims
            ):
                found.append(c)
    return found


@pytest.fixture(scope="module")
def compiled():
    one = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    eight = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    return compile_programs(one), compile_programs(eight)


def test_fsdp_update_memory_is_sharded(compiled):
    (update1, logp1), (update8, logp8) = compiled
    temp1 = update1.memory_analysis().temp_size_in_bytes
    temp8 = update8.memory_analysis().temp_size_in_bytes
    assert temp8 <= temp1 / 3, (temp1, temp8)
    lp1 = logp1.memory_analysis().temp_size_in_bytes
    lp8 = logp8.memory_analysis().temp_size_in_bytes
    assert lp8 <= lp1 / 3, (lp1, lp8)


def test_fsdp_collectives_move_weights_not_activations(compiled):
    _, (update8, logp8) = compiled
    for program in (update8, logp8):
        text = program.as_text()
        assert activation_all_reduces(text) == []
        kinds = hlo.summary(hlo.collectives(text))
        assert kinds["all-gather"][0] > 0  # the weights, per layer
    # the update's largest collectives are weight-sized: the biggest all-reduce is no larger
    # than the largest parameter (the embedding), not a [rows, T, ...] activation
    biggest = max(
        (c for c in hlo.collectives(update8.as_text()) if c.kind == "all-reduce"),
        key=lambda c: max(np.prod(d) for _, d in c.shapes),
    )
    assert max(np.prod(d) for _, d in biggest.shapes) <= CFG.vocab_size * CFG.hidden_size


def test_activation_all_reduce_detector_sees_tensor_parallel_all_reduces():
    """On a tensor-parallel mesh the o_proj / down_proj outputs are (Megatron-style)
    all-reduced over ``tensor``: the detector of the test above must see them."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    update, _ = compile_programs(mesh)
    assert activation_all_reduces(update.as_text())


def _params(seed=0):
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))), nnx.Param
    )
    rng = np.random.default_rng(seed)

    def init(path, x):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(init, abstract)


def _batch(rows=8, t=24, seed=0):
    from meljax.rl.batch import build_policy_batch, build_sequence_batch

    rng = np.random.default_rng(seed)
    v = CFG.vocab_size
    prompts = [list(rng.integers(1, v, rng.integers(2, 6))) for _ in range(rows)]
    comps = [list(rng.integers(1, v, rng.integers(3, 12))) for _ in range(rows)]
    pol = build_policy_batch(
        prompts,
        comps,
        advantages=rng.normal(size=rows),
        rewards=rng.integers(0, 2, rows),
        group_index=np.arange(rows) // 4,
        old_logprobs=[list(rng.normal(-5.0, 0.3, len(c))) for c in comps],
        length_buckets=(t,),
    )
    mel = build_sequence_batch(
        [list(rng.integers(1, v, 4)) for _ in range(2)],
        [list(rng.integers(1, v, 5)) for _ in range(2)],
        length_buckets=(t,),
        min_rows=8,
    )
    return TrainBatch(pol, mel)


@pytest.mark.parametrize("shape", [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}])
def test_sharded_update_and_logprobs_equal_one_device(shape):
    """With the activation constraints active (mesh in context), FSDP and FSDP x tensor
    parallelism give the single-device update and log-probs."""
    graphdef, params = _params()
    opt = optax.sgd(0.1, momentum=0.9)
    loss_cfg = losses.LossConfig(logprob_chunk=8)
    batch = _batch()
    ref_state, ref_m = ts.make_train_step(graphdef, opt, loss_cfg, donate=False)(
        ts.init_train_state(params, opt), batch
    )
    ref_lp = ts.make_compute_logprobs(graphdef, chunk_size=8)(params, batch.policy.seq)
    mesh = shd.make_mesh({"data": 1, "tensor": 1, **shape})
    state = ts.init_train_state(params, opt, mesh)
    new, m = ts.make_train_step(graphdef, opt, loss_cfg, mesh=mesh, num_microbatches=1)(
        state, batch
    )
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(new.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    lp = ts.make_compute_logprobs(graphdef, mesh=mesh, chunk_size=8)(new.params, batch.policy.seq)
    ref_lp_new = ts.make_compute_logprobs(graphdef, chunk_size=8)(
        ref_state.params, batch.policy.seq
    )
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp_new), atol=1e-5)
    assert np.asarray(ref_lp).shape == np.asarray(lp).shape
