"""Advantages, chunked log-probs and the GRPO / RFT / MEL objectives against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meljax.models import ModelConfig, Transformer
from meljax.rl import advantages, logprobs
from meljax.rl import objective as losses
from meljax.rl.batch import PolicyBatch, SequenceBatch, TrainBatch, build_sequence_batch

EPS = 1e-6


# ------------------------------------------------------------------------------------- advantages


def test_grpo_advantages_hand_values():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
    adv = np.asarray(advantages.grpo_advantages(r, eps=EPS))
    s1 = 0.5 + EPS  # mean 0.5, population std 0.5
    s2 = np.sqrt(3.0) / 4 + EPS  # mean 0.25, std sqrt(0.25 * 0.75)
    want = np.array(
        [[0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1], [-0.25 / s2] * 3 + [0.75 / s2]], np.float32
    )
    np.testing.assert_allclose(adv, want, rtol=1e-6)
    assert adv.shape == r.shape and adv.dtype == np.float32


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_all_equal_groups_get_exactly_zero(name):
    # 0.1 * 3 in float32: the mean differs from 0.1 by ~7e-9, so (r - mean) / (std + eps) would
    # be ~ -0.007, not 0.
    r = np.array([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    adv = np.asarray(advantages.compute_advantages(name, r))
    assert np.all(adv[:3] == 0.0)
    assert np.all(adv[3] != 0.0)


def test_drgrpo_rloo_raw_hand_values():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(
        advantages.drgrpo_advantages(r), [[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]]
    )
    # leave-one-out: r_i - mean of the other three
    np.testing.assert_allclose(
        advantages.rloo_advantages(r),
        [[1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], [1.0, -1 / 3, -1 / 3, -1 / 3]],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(advantages.rloo_advantages(np.ones((2, 1))), np.zeros((2, 1)))
    np.testing.assert_array_equal(advantages.compute_advantages("raw", r), r)


def test_reinforce_pp_normalises_over_the_whole_batch():
    r = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    s = np.sqrt(0.1875) + EPS  # batch mean 0.75, population std sqrt(3/16)
    np.testing.assert_allclose(
        advantages.reinforce_pp_advantages(r, eps=EPS),
        [[0.25 / s, -0.75 / s], [0.25 / s, 0.25 / s]],
        rtol=1e-6,
    )
    # group-mean baseline first: x = [[.5, -.5], [0, 0]], mean 0, std sqrt(1/8)
    s = np.sqrt(0.125) + EPS
    np.testing.assert_allclose(
        advantages.reinforce_pp_advantages(r, eps=EPS, group_baseline=True),
        [[0.5 / s, -0.5 / s], [0.0, 0.0]],
        rtol=1e-6,
    )
    assert np.all(np.asarray(advantages.reinforce_pp_advantages(np.full((3, 4), 0.1))) == 0.0)


def test_advantages_from_config_passes_eps_only_where_used():
    r = np.array([[1.0, 0.0]], np.float32)
    cfg = losses.LossConfig(advantage="grpo", adv_eps=0.5)
    np.testing.assert_allclose(
        losses.advantages_from_config(cfg, r), [[0.5, -0.5]]
    )  # 0.5/(0.5+0.5)
    cfg = losses.LossConfig(advantage="rloo", adv_eps=0.5)
    np.testing.assert_allclose(losses.advantages_from_config(cfg, r), [[1.0, -1.0]])


@pytest.mark.parametrize("name", ["grpo", "reinforce_pp", "drgrpo", "rloo", "raw"])
def test_default_adv_eps_gives_the_estimators_own_default_bit_for_bit(name):
    # algorithm.adv_eps now reaches the rollout's advantages: its default must change nothing.
    r = np.random.default_rng(0).integers(0, 3, (5, 4)).astype(np.float32) / 2
    assert losses.LossConfig().adv_eps == advantages.ADV_EPS
    own = np.asarray(advantages.compute_advantages(name, r))
    np.testing.assert_array_equal(
        advantages.advantages_with_eps(name, r, losses.LossConfig().adv_eps), own
    )


def test_compute_advantages_errors():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        advantages.compute_advantages("ppo", np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\[num_questions, G\]"):
        advantages.compute_advantages("grpo", np.zeros(4))


# ------------------------------------------------------------------------------ chunked log-probs


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )
    # initialised on the host: an eager nnx init compiles one small program per weight
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
    return nnx.merge(graphdef, params)


def _seq(t=10):
    return build_sequence_batch(
        [[1, 2, 3], [4], [5, 6]], [[7, 8, 9, 10], [11, 12], [13]], length_buckets=(t,)
    )


def _reference_logprobs(model, seq):
    if isinstance(model, tuple):
        model = nnx.merge(*model)
    logits = model(jnp.asarray(seq.tokens), jnp.asarray(seq.positions), jnp.asarray(seq.kv_mask))
    logsm = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logsm[:, :-1], jnp.asarray(seq.tokens)[:, 1:, None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logsm) * logsm, axis=-1)[:, :-1]
    pad = jnp.zeros((logits.shape[0], 1))
    return jnp.concatenate([pad, picked], 1), jnp.concatenate([pad, ent], 1)


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64])
def test_chunked_logprobs_match_full_log_softmax(tiny_model, chunk):
    seq = _seq()
    split = nnx.split(tiny_model, nnx.Param)
    want_lp, want_ent = jax.jit(_reference_logprobs)(split, seq)
    lp, ent = jax.jit(lambda m, s: logprobs.sequence_logprobs(m, s, chunk_size=chunk))(split, seq)
    assert lp.shape == seq.tokens.shape == ent.shape
    np.testing.assert_allclose(lp, want_lp, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, atol=1e-5)
    assert np.all(np.asarray(lp[:, 0]) == 0.0)


@pytest.mark.parametrize(
    "length, limit, want",
    [
        (192, 128, (96, 2)),  # even split, nothing padded (was 2 x 128)
        (256, 128, (128, 2)),
        (193, 128, (104, 2)),  # padded: rounded up to a multiple of 8
        (10, 3, (3, 4)),  # padded by 2, the limit wins over the rounding
        (10, 64, (10, 1)),
        (5, 0, (1, 5)),
    ],
)
def test_chunk_layout_pads_little(length, limit, want):
    chunk, chunks = logprobs.chunk_layout(length, limit)
    assert (chunk, chunks) == want
    assert chunk <= max(limit, 1) and 0 <= chunk * chunks - length < 8 * chunks


@pytest.mark.parametrize("chunk", [3])  # 4 chunks, the last one padded
def test_chunked_logprobs_gradient_matches_unchunked(tiny_model, chunk):
    seq = _seq()
    graphdef, params = nnx.split(tiny_model, nnx.Param)
    w = jnp.asarray(np.random.default_rng(0).normal(size=seq.tokens.shape), jnp.float32)

    def chunked(p):
        lp, _ = logprobs.sequence_logprobs((graphdef, p), seq, chunk_size=chunk)
        return jnp.sum(lp * w)

    def full(p):
        lp, _ = _reference_logprobs(nnx.merge(graphdef, p), seq)
        return jnp.sum(lp * w)

    g1, g2 = jax.jit(jax.grad(chunked))(params), jax.jit(jax.grad(full))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------- policy losses


def test_clipped_surrogate_hand_values():
    rho = np.array([[1.5, 1.5, 0.5, 0.5, 1.1, 3.0]], np.float32)
    adv = np.array([[1.0, -1.0, -1.0, 1.0, 2.0, 1.0]], np.float32)
    old = np.zeros_like(rho)
    mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
    loss, clipped, _ = losses.clipped_surrogate(np.log(rho), old, adv, mask, 0.2, 0.28)
    # min(rho A, clip(rho, 0.8, 1.28) A): 1.28; -1.5; -0.8; 0.5; 2.2; masked -> 0
    np.testing.assert_allclose(loss, [[-1.28, 1.5, 0.8, -0.5, -2.2, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[1, 0, 1, 0, 0, 0]])
    # no gradient through clipped tokens; d(-rho A)/dlogp = -rho A elsewhere
    g = jax.grad(lambda lp: losses.clipped_surrogate(lp, old, adv, mask, 0.2, 0.28)[0].sum())(
        jnp.log(rho)
    )
    np.testing.assert_allclose(g, [[0.0, 1.5, 0.0, -0.5, -2.2, 0.0]], rtol=1e-6)


def _policy(logp_rows, mask_rows, adv, weight, rewards=None, old=None, ref=None):
    """A PolicyBatch from explicit per-token arrays (T = 4, column 0 context)."""
    mask = np.array(mask_rows, np.float32)
    b, t = mask.shape
    seq = SequenceBatch(
        tokens=np.ones((b, t), np.int32),
        kv_mask=np.ones((b, t), bool),
        positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        loss_mask=mask,
        weight=np.array(weight, np.float32),
    )
    lp = np.array(logp_rows, np.float32)
    return (
        PolicyBatch(
            seq=seq,
            advantages=np.array(adv, np.float32),
            old_logprobs=lp if old is None else np.array(old, np.float32),
            ref_logprobs=np.zeros_like(lp) if ref is None else np.array(ref, np.float32),
            rewards=np.zeros(b, np.float32) if rewards is None else np.array(rewards, np.float32),
            group_index=np.zeros(b, np.int32),
        ),
        lp,
    )


def _empty_mel(rows=2, t=4):
    z = np.zeros((rows, t), np.float32)
    return SequenceBatch(
        np.zeros((rows, t), np.int32),
        np.zeros((rows, t), bool),
        np.zeros((rows, t), np.int32),
        z,
        np.zeros(rows, np.float32),
    )


# rows: two tokens, a single-token answer, a real row with no token, a padding row (weight 0;
# its mask is deliberately non-zero to check that the weight alone drops it)
MASKS = [[0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]]
WEIGHT = [1.0, 1.0, 1.0, 0.0]
ADV = [1.0, -4.0, 3.0, 5.0]


@pytest.mark.parametrize(
    "aggregation, want",
    [
        ("seq_mean_token_mean", (-1.0 + 4.0 + 0.0) / 3),  # per-row means, over 3 real rows
        ("token_mean", (-1.0 - 1.0 + 4.0) / 3),  # over 3 loss tokens
        ("seq_mean_token_sum_norm", (-2.0 / 4 + 4.0 / 4 + 0.0) / 3),  # sums / max_len=4
    ],
)
def test_grpo_loss_aggregations(aggregation, want):
    # rho = 1 everywhere (old == current), so every token's loss is -A
    pol, lp = _policy(np.full((4, 4), -1.0), MASKS, ADV, WEIGHT)
    cfg = losses.LossConfig(aggregation=aggregation, max_len=4)
    den = losses.compute_denominators(TrainBatch(pol, _empty_mel()), cfg)
    lp_nan = np.where(np.array(MASKS) * np.array(WEIGHT)[:, None] > 0, lp, np.nan)
    loss, metrics = losses.grpo_loss(jnp.asarray(lp_nan), jnp.zeros_like(lp), pol, cfg, den)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert float(metrics["clip_frac"]) == 0.0
    np.testing.assert_allclose(metrics["adv_mean"], 0.0, atol=1e-7)  # (1 - 4 + 3) / 3
    np.testing.assert_allclose(metrics["approx_kl"], 0.0, atol=1e-7)
    # no gradient reaches positions off the loss mask or in the padding row
    g = jax.grad(lambda x: losses.grpo_loss(x, jnp.zeros_like(x), pol, cfg, den)[0])(
        jnp.asarray(lp)
    )
    off = (np.array(MASKS) * np.array(WEIGHT)[:, None]) == 0
    assert np.all(np.asarray(g)[off] == 0.0)
    assert np.all(np.asarray(g)[~off] != 0.0)


def test_grpo_loss_kl_and_metrics():
    # one row, two tokens: rho = 2 and 0.5, A = 1, eps 0.2 -> per-token -1.2 and -0.5
    old = [[0.0, np.log(0.25), np.log(0.5), 0.0]]
    lp = [[0.0, np.log(0.5), np.log(0.25), 0.0]]
    ref = [[0.0, np.log(0.25), np.log(0.25), 0.0]]
    pol, lp = _policy(lp, [[0, 1, 1, 0]], [1.0], [1.0], old=old, ref=ref)
    ent = np.array([[0.0, 2.0, 4.0, 9.0]], np.float32)
    for est, kl_tokens in [
        ("k1", [np.log(2.0), 0.0]),
        ("k3", [0.5 - np.log(0.5) - 1.0, 0.0]),  # exp(d) - d - 1, d = ref - logp
    ]:
        cfg = losses.LossConfig(kl_beta=0.1, kl_estimator=est)
        den = losses.compute_denominators(TrainBatch(pol, _empty_mel()), cfg)
        loss, m = losses.grpo_loss(jnp.asarray(lp), jnp.asarray(ent), pol, cfg, den)
        kl = np.mean(kl_tokens)
        np.testing.assert_allclose(m["policy_loss"], (-1.2 - 0.5) / 2, rtol=1e-6)
        np.testing.assert_allclose(m["kl_ref"], kl, rtol=1e-5)
        np.testing.assert_allclose(loss, (-1.2 - 0.5) / 2 + 0.1 * kl, rtol=1e-5)
    np.testing.assert_allclose(m["clip_frac"], 0.5)  # rho = 2 > 1.2 with A > 0
    np.testing.assert_allclose(m["entropy"], 3.0)
    # k3 of pi_old -> pi: (r - 1) - log r with r = 2 and 0.5
    np.testing.assert_allclose(
        m["approx_kl"], ((1 - np.log(2)) + (-0.5 + np.log(2))) / 2, rtol=1e-5
    )


def test_nan_advantage_makes_loss_nan():
    """The step relies on this to detect and skip a poisoned batch."""
    pol, lp = _policy(np.full((1, 4), -1.0), [[0, 1, 1, 0]], [np.nan], [1.0])
    cfg = losses.LossConfig()
    den = losses.compute_denominators(TrainBatch(pol, _empty_mel()), cfg)
    loss, _ = losses.grpo_loss(jnp.asarray(lp), jnp.zeros_like(lp), pol, cfg, den)
    assert not np.isfinite(float(loss))


def test_rft_trains_on_correct_rows_only():
    lp = [[0.0, -1.0, -3.0, 0.0], [0.0, -5.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0]]
    pol, lp = _policy(lp, [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0]], [0, 0, 0], [1, 1, 1])
    pol = pol.replace(rewards=np.array([1.0, 0.0, 1.0], np.float32))
    cfg = losses.LossConfig(name="rft")
    den = losses.compute_denominators(TrainBatch(pol, _empty_mel()), cfg)
    loss, m = losses.policy_objective(jnp.asarray(lp), jnp.zeros_like(lp), pol, cfg, den)
    np.testing.assert_allclose(loss, (2.0 + 2.0) / 2)  # row means 2 and 2 over 2 rows
    np.testing.assert_allclose(m["rft_frac"], 2 / 3, rtol=1e-6)
    none = pol.replace(rewards=np.zeros(3, np.float32))
    den = losses.compute_denominators(TrainBatch(none, _empty_mel()), cfg)
    loss, _ = losses.policy_objective(jnp.asarray(lp), jnp.zeros_like(lp), none, cfg, den)
    assert float(loss) == 0.0


# ----------------------------------------------------------------------------------------- MEL


def _mel_batch(weight):
    # row 0: context 2 tokens, M = 2 tokens; row 1: context 1, M = 1 token; row 2: context only
    mask = np.array([[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    return SequenceBatch(
        tokens=np.ones((3, 4), np.int32),
        kv_mask=np.ones((3, 4), bool),
        positions=np.tile(np.arange(4, dtype=np.int32), (3, 1)),
        loss_mask=mask,
        weight=np.array(weight, np.float32),
    )


def test_mel_loss_hand_value_and_context_gets_no_gradient():
    mel = _mel_batch([1.0, 1.0, 0.0])
    lp = jnp.array([[0.0, -7.0, -1.0, -3.0], [0.0, -0.5, -9.0, -9.0], [0.0, -4.0, -4.0, -4.0]])
    pol, _ = _policy(np.zeros((1, 4)), [[0, 1, 0, 0]], [0.0], [1.0])
    cfg = losses.LossConfig(lambda_mel=2.0)
    den = losses.compute_denominators(TrainBatch(pol, mel), cfg)
    assert float(den.mel_rows) == 2.0 and float(den.mel_tokens) == 3.0
    loss, m = losses.mel_loss(lp, mel, cfg, den)
    np.testing.assert_allclose(m["mel_nll"], (2.0 + 0.5) / 2)
    np.testing.assert_allclose(loss, 2.0 * 1.25)
    g = np.asarray(jax.grad(lambda x: losses.mel_loss(x, mel, cfg, den)[0])(lp))
    # d/dlogp = -lambda / (|M| N_kept) on meta-experience tokens, 0 on context and dropped rows
    want = -2.0 * np.array([[0, 0, 0.25, 0.25], [0, 0.5, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(g, want)


def test_mel_with_no_kept_row_is_exactly_zero():
    mel = _mel_batch([0.0, 0.0, 0.0])
    # garbage log-probs on dropped rows must not leak NaN
    lp = jnp.full((3, 4), jnp.nan)
    pol, _ = _policy(np.zeros((1, 4)), [[0, 1, 0, 0]], [0.0], [1.0])
    cfg = losses.LossConfig()
    den = losses.compute_denominators(TrainBatch(pol, mel), cfg)
    loss, m = losses.mel_loss(lp, mel, cfg, den)
    assert float(loss) == 0.0 and float(m["mel_nll"]) == 0.0 and float(m["mel_rows"]) == 0.0
    g = jax.grad(lambda x: losses.mel_loss(x, mel, cfg, den)[0])(jnp.zeros((3, 4)))
    assert np.all(np.asarray(g) == 0.0)


# ------------------------------------------------------------------- exact micro-batch splitting


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("algorithm", losses.ALGORITHMS)
def test_split_batches_sum_to_the_full_loss(aggregation, algorithm):
    rng = np.random.default_rng(1)
    b, t = 8, 12
    lengths = [1, 7, 3, 0, 10, 2, 5, 4]
    mask = np.zeros((b, t), np.float32)
    for i, n in enumerate(lengths):
        mask[i, 1 : 1 + n] = 1
    weight = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    mask[6:] = 0
    lp = rng.normal(-2, 0.5, (b, t)).astype(np.float32)
    old = (lp + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    pol, lp = _policy(lp, mask, rng.normal(size=b), weight, rewards=rng.integers(0, 2, b), old=old)
    mel = _mel_batch([1.0, 1.0, 0.0])
    mel_lp = rng.normal(-1, 0.3, (3, 4)).astype(np.float32)
    cfg = losses.LossConfig(name=algorithm, aggregation=aggregation, max_len=16)
    den = losses.compute_denominators(TrainBatch(pol, mel), cfg)
    ent = rng.random((b, t)).astype(np.float32)

    def total(p, x, e):
        return losses.policy_objective(jnp.asarray(x), jnp.asarray(e), p, cfg, den)

    full_loss, full_m = total(pol, lp, ent)
    parts = [jax.tree.map(lambda a, k=k: a[k::4], (pol, lp, ent)) for k in range(4)]
    split = [total(*p) for p in parts]
    np.testing.assert_allclose(sum(s[0] for s in split), full_loss, rtol=1e-5, atol=1e-7)
    for key, v in full_m.items():
        np.testing.assert_allclose(sum(s[1][key] for s in split), v, rtol=1e-5, atol=1e-7)
    mel_full = losses.mel_loss(jnp.asarray(mel_lp), mel, cfg, den)[0]
    mel_split = sum(
        losses.mel_loss(
            jnp.asarray(mel_lp[k::3]), jax.tree.map(lambda a, k=k: a[k::3], mel), cfg, den
        )[0]
        for k in range(3)
    )
    np.testing.assert_allclose(mel_split, mel_full, rtol=1e-6)


def test_loss_config_validation_and_mapping():
    with pytest.raises(ValueError, match="aggregation='mean'"):
        losses.LossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="name='ppo'"):
        losses.LossConfig(name="ppo")
    with pytest.raises(ValueError, match="kl_estimator"):
        losses.LossConfig(kl_estimator="k2")
    cfg = losses.LossConfig(eps_high=0.28, use_mel=False)
    assert cfg.eps_high == 0.28 and cfg.use_mel is False and cfg.eps_low == 0.2
