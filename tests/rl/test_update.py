"""The update step: exact micro-batching, sharding, non-finite skip, MEL gradient, a GRPO toy run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from meljax.models import ModelConfig, Transformer
from meljax.rl import advantages, optim
from meljax.rl import objective as losses
from meljax.rl import update as ts
from meljax.rl.batch import TrainBatch, build_policy_batch, build_sequence_batch
from meljax.runtime import sharding as shd
from tests.conftest import small_model_config

VOCAB = 16
CFG = small_model_config(VOCAB)


LR = 0.05
# SGD with momentum: the first update is exactly -LR * gradient (so equal new params mean equal
# gradients), and it has an optimizer state shaped like the params (to check its sharding).
OPT = optax.sgd(LR, momentum=0.9)
LOSS_CFG = losses.LossConfig(logprob_chunk=4)


def tiny_params(cfg: ModelConfig, seed: int = 0, std: float = 0.1):
    """``(graphdef, params)`` of a random model, initialised on the host (an eager nnx init
    compiles one tiny program per weight: seconds on a loaded 2-core machine)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(seed)

    def init(path, s):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0, std, s.shape), s.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(init, shapes)


@pytest.fixture(scope="module")
def model_parts():
    return tiny_params(CFG)


@pytest.fixture(scope="module")
def shared_step(model_parts):
    """One compiled single-device step (momentum SGD, no micro-batching), used by several tests."""
    return ts.make_train_step(
        model_parts[0], OPT, LOSS_CFG, schedule=optax.constant_schedule(LR), donate=False
    )


@pytest.fixture(scope="module")
def reference(model_parts, shared_step):
    """The batch, the initial state and the single-device, single-micro-batch result."""
    batch = _batch()
    state = ts.init_train_state(model_parts[1], OPT)
    new_state, metrics = shared_step(state, batch)
    return batch, state, new_state, metrics


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _batch(seed=0, mel_kept=2, rows=8, mel_rows=8):
    """Rollouts with uneven completion lengths (1..9 tokens) + a MEL batch with ``mel_kept``
    kept meta-experiences (the other rows are padding)."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, VOCAB, rng.integers(1, 4))) for _ in range(rows)]
    comps = [list(rng.integers(1, VOCAB, n)) for n in [1, 9, 3, 5, 2, 8, 4, 6][:rows]]
    old = [list(rng.normal(-2.5, 0.3, len(c))) for c in comps]
    pol = build_policy_batch(
        prompts,
        comps,
        advantages=rng.normal(size=rows),
        rewards=rng.integers(0, 2, rows),
        group_index=np.arange(rows) // 4,
        old_logprobs=old,
        length_buckets=(16,),
    )
    contexts = [list(rng.integers(1, VOCAB, 5)) for _ in range(mel_kept)]
    targets = [list(rng.integers(1, VOCAB, n)) for n in [3, 6, 2, 4][:mel_kept]]
    mel = build_sequence_batch(contexts, targets, length_buckets=(16,), min_rows=mel_rows)
    return TrainBatch(pol, mel)


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def _max_change(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True)
    )


def test_microbatches_equal_the_full_batch(model_parts, reference):
    batch, state, full, m_full = reference
    step = ts.make_train_step(model_parts[0], OPT, LOSS_CFG, num_microbatches=4, donate=False)
    acc, m_acc = step(state, batch)
    _assert_trees_close(acc.params, full.params, atol=1e-6, rtol=1e-5)
    for k, v in m_full.items():
        if k != "lr":
            np.testing.assert_allclose(m_acc[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # the step did move the weights, and both loss terms were active
    assert _max_change(full.params, state.params) > 1e-3
    assert float(m_full["mel_rows"]) == 2.0 and float(m_full["mel_nll"]) > 0
    assert float(m_full["policy_loss"]) != 0.0


def test_sharded_step_matches_one_device(model_parts, reference):
    batch, state, ref, m_ref = reference
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    sharded_state = ts.init_train_state(model_parts[1], OPT, mesh)
    step = ts.make_train_step(model_parts[0], OPT, LOSS_CFG, mesh=mesh, num_microbatches=2)
    new, m_sh = step(sharded_state, batch)
    _assert_trees_close(new.params, ref.params, atol=1e-6, rtol=1e-5)
    _assert_trees_close(new.opt_state, ref.opt_state, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(m_sh["loss"], m_ref["loss"], rtol=1e-6)
    # weights and their optimizer state stay sharded by their logical axes
    fsdp = jax.sharding.PartitionSpec(None, "fsdp", None, None)  # [layers, embed, heads, hd]
    assert new.params["layers"]["attn"]["q_proj"][...].sharding.spec == fsdp
    momentum = new.opt_state[0].trace["layers"]["attn"]["q_proj"][...]
    assert momentum.sharding.spec == fsdp


def test_sharded_compute_logprobs_matches_one_device(model_parts):
    graphdef, params = model_parts
    seq = _batch().policy.seq
    want = ts.make_compute_logprobs(graphdef, chunk_size=16)(params, seq)
    # all three mesh axes; 2 micro-batches of 4 rows = one row per data-parallel shard
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state = ts.init_train_state(params, OPT, mesh)
    assert state.params["lm_head"][...].sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor"
    )
    compute = ts.make_compute_logprobs(graphdef, mesh=mesh, chunk_size=4, num_microbatches=2)
    got = compute(state, seq)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.sharding.spec == shd.batch_sharding(mesh, 2).spec


def test_nonfinite_update_is_skipped(reference, shared_step):
    batch, state, _, _ = reference
    bad = batch.replace(
        policy=batch.policy.replace(advantages=np.full_like(batch.policy.advantages, np.nan))
    )
    before = _host(state)
    state, m = shared_step(state, bad)
    assert int(m["skipped"]) == 1 and int(state.skipped_steps) == 1 and int(state.step) == 1
    assert not np.isfinite(float(m["loss"]))
    _assert_trees_close(state.params, before.params, rtol=0, atol=0)
    _assert_trees_close(state.opt_state, before.opt_state, rtol=0, atol=0)
    # training goes on: the next good batch is applied, the counter stays
    state, m = shared_step(state, batch)
    assert int(m["skipped"]) == 0 and int(state.skipped_steps) == 1 and int(state.num_updates) == 1
    assert np.isfinite(float(m["loss"])) and float(m["lr"]) == pytest.approx(LR)
    assert _max_change(state.params, before.params) > 1e-3


def _reference_mel_nll(graphdef, params, mel):
    """-mean over kept rows of the mean log-prob of their target tokens, from full logits."""
    model = nnx.merge(graphdef, params)
    logits = model(jnp.asarray(mel.tokens), jnp.asarray(mel.positions), jnp.asarray(mel.kv_mask))
    logsm = jax.nn.log_softmax(logits[:, :-1], -1)
    lp = jnp.take_along_axis(logsm, jnp.asarray(mel.tokens)[:, 1:, None], -1)[..., 0]
    mask = jnp.asarray(mel.loss_mask)[:, 1:]
    kept = jnp.asarray(mel.weight) > 0
    per_row = jnp.sum(lp * mask, -1) / jnp.maximum(mask.sum(-1), 1)
    return -jnp.sum(jnp.where(kept, per_row, 0)) / kept.sum()


def test_mel_gradient_is_the_nll_of_meta_experience_tokens(model_parts, shared_step):
    """One SGD step moves the weights by exactly the gradient of the NLL of the meta-experience
    tokens (context tokens carry no loss) and makes those tokens more likely."""
    graphdef, params = model_parts
    batch = _batch(seed=3, mel_kept=3)
    # zero advantages: the policy term has no gradient, only MEL moves the weights
    batch = batch.replace(
        policy=batch.policy.replace(advantages=np.zeros_like(batch.policy.advantages))
    )
    state = ts.init_train_state(params, OPT)
    new, m = shared_step(state, batch)
    nll_and_grad = jax.jit(jax.value_and_grad(lambda p, mel: _reference_mel_nll(graphdef, p, mel)))
    nll_before, ref_grad = nll_and_grad(params, batch.mel)
    want = jax.tree.map(lambda p, g: p - LR * g, params, ref_grad)
    _assert_trees_close(new.params, want, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(m["mel_nll"], nll_before, rtol=1e-5)
    assert float(m["mel_rows"]) == 3.0
    assert float(nll_and_grad(new.params, batch.mel)[0]) < float(nll_before) - 1e-3
    # no kept meta-experience: same shapes, same compiled step, MEL term exactly 0, no update
    none = batch.replace(mel=batch.mel.replace(weight=np.zeros_like(batch.mel.weight)))
    state2, m0 = shared_step(state, none)
    assert float(m0["mel_nll"]) == 0.0 and float(m0["mel_rows"]) == 0.0
    assert float(m0["grad_norm"]) == 0.0
    _assert_trees_close(state2.params, params, rtol=0, atol=0)
    assert shared_step._cache_size() == 1


def test_recomputed_old_logprobs_give_unit_ratio_and_passes(model_parts, shared_step):
    graphdef, params = model_parts
    batch = _batch(seed=5)
    state = ts.init_train_state(params, OPT)
    compute = ts.make_compute_logprobs(graphdef, chunk_size=4, num_microbatches=2)
    old = np.asarray(compute(state, batch.policy.seq))
    mask = np.asarray(batch.policy.seq.loss_mask) > 0
    assert np.all(old[~mask] == 0.0) and np.all(old[mask] < 0.0)

    state, metrics = ts.train_on_batch(
        state, batch, shared_step, num_passes=2, old_logprobs="recompute", compute_logprobs=compute
    )
    assert len(metrics) == 2 and int(state.step) == 2
    # the first update sees pi_theta == pi_old: ratio 1 on every token
    assert float(metrics[0]["approx_kl"]) < 1e-6 and float(metrics[0]["clip_frac"]) == 0.0
    # the second pass sees a policy that has moved away from pi_old
    assert float(metrics[1]["approx_kl"]) > 1e-5


def test_train_on_batch_minibatches_cover_every_row_once_per_pass():
    batch = _batch()
    # tag rows so that each mini-batch can be traced back to the rows it holds
    batch = batch.replace(
        policy=batch.policy.replace(rewards=np.arange(8, dtype=np.float32)),
        mel=batch.mel.replace(weight=np.arange(8, dtype=np.float32)),
    )
    seen = []

    def fake_step(state, part):
        assert part.policy.seq.tokens.shape == (4, 16) and part.mel.tokens.shape == (4, 16)
        seen.append((np.asarray(part.policy.rewards), np.asarray(part.mel.weight)))
        return state, {}

    _, metrics = ts.train_on_batch(
        None, batch, fake_step, num_passes=3, num_minibatches=2, shuffle_seed=0
    )
    assert len(metrics) == 6
    orders = []
    for p in range(3):
        pol = np.concatenate([seen[2 * p][0], seen[2 * p + 1][0]])
        mel = np.concatenate([seen[2 * p][1], seen[2 * p + 1][1]])
        assert sorted(pol) == list(range(8)) and sorted(mel) == list(range(8))
        orders.append(tuple(pol))
    assert len(set(orders)) > 1  # reshuffled between passes
    with pytest.raises(ValueError, match="not divisible by num_minibatches=3"):
        ts.train_on_batch(None, batch, fake_step, num_minibatches=3)
    with pytest.raises(ValueError, match="needs compute_logprobs"):
        ts.train_on_batch(None, batch, fake_step, old_logprobs="recompute")


def test_bf16_params_train_with_f32_master_weights():
    cfg = CFG.replace(num_layers=1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, params = tiny_params(cfg)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    state = ts.init_train_state(params, OPT)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state))
    before = _host(state.params)
    step = ts.make_train_step(graphdef, OPT, losses.LossConfig(use_mel=False))
    new, m = step(state, _batch())  # donates ``state``
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    assert _max_change(new.params, before) > 0


def test_schedule_and_decay_mask():
    cfg = optim.OptimizerConfig(
        learning_rate=1.0, schedule="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1
    )
    _, sched = optim.make_optimizer(cfg)
    np.testing.assert_allclose(
        [sched(0), sched(5), sched(10), sched(60), sched(110)],
        [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1],
        rtol=1e-6,
        atol=1e-7,
    )
    mask = optim.decay_mask({"w": jnp.ones((2, 2)), "norm": jnp.ones(2)})
    assert mask == {"w": True, "norm": False}
    # stacked per-layer weights: the layer axis does not make a norm scale a matrix
    _, params = tiny_params(CFG)
    flat = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
    }
    decayed = {k for k, v in flat.items() if v}
    assert any("q_proj" in k for k in decayed) and any("embed" in k for k in decayed)
    assert not any("norm" in k for k in decayed), decayed
    with pytest.raises(ValueError, match="total_steps"):
        optim.OptimizerConfig(schedule="cosine", warmup_steps=5, total_steps=5)


TARGETS = (3, 5, 7)


def test_grpo_toy_run_raises_reward():
    """Prompt = one fixed token; reward 1 iff the single sampled answer token is in TARGETS
    (chance 3/16). GRPO should learn to put its mass on TARGETS."""
    graphdef, params = tiny_params(CFG, seed=7, std=0.02)  # near-uniform start
    opt, _ = optim.make_optimizer(
        optim.OptimizerConfig(learning_rate=3e-3, weight_decay=0.0, max_grad_norm=1.0)
    )
    state = ts.init_train_state(params, opt)
    cfg = losses.LossConfig(use_mel=False, logprob_chunk=4)
    step = ts.make_train_step(graphdef, opt, cfg)
    q, g = 4, 8

    @jax.jit
    def sample(params, key):
        logits = nnx.merge(graphdef, params)(jnp.ones((1, 1), jnp.int32))[0, -1]
        tok = jax.random.categorical(key, logits, shape=(q * g,))
        return tok, jax.nn.log_softmax(logits)[tok]

    key = jax.random.key(0)
    mel = build_sequence_batch([], [], length_buckets=(4,), min_rows=1)
    rewards_seen = []
    for _ in range(40):
        key, sub = jax.random.split(key)
        tok, lp = map(np.asarray, sample(state.params, sub))
        r = np.isin(tok, TARGETS).astype(np.float32).reshape(q, g)
        adv = np.asarray(advantages.grpo_advantages(r)).reshape(-1)
        pol = build_policy_batch(
            [[1]] * (q * g),
            [[int(t)] for t in tok],
            advantages=adv,
            rewards=r.reshape(-1),
            group_index=np.repeat(np.arange(q), g),
            old_logprobs=[[float(x)] for x in lp],
            length_buckets=(4,),
        )
        state, m = step(state, TrainBatch(pol, mel))
        rewards_seen.append(float(r.mean()))
    assert np.mean(rewards_seen[:3]) < 0.5
    assert np.mean(rewards_seen[-5:]) > 0.8, rewards_seen
    assert int(state.skipped_steps) == 0
