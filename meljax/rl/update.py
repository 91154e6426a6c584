"""The sharded update step on a ``TrainState``: exact gradient accumulation, skip on non-finite.

One call of ``train_step(state, batch)`` is one optimizer update on ``L = L_policy + lambda_mel *
L_NLL`` (``meljax.rl.objective``). Inside the jitted step:

1. the global denominators of the whole ``TrainBatch`` are computed from its masks;
2. the policy rows are split into ``num_microbatches`` micro-batches (row ``b`` goes to
   micro-batch ``b % num_microbatches``, so with the batch sharded over the data axes every
   micro-batch is split evenly across devices without any data movement) and gradients are
   summed over a ``lax.scan``; the meta-experience rows follow in the same way. Because every
   loss is a sum of per-row contributions over global denominators, the summed gradient equals
   the full-batch gradient (up to float rounding). A shared-prompt batch
   (``meljax.rl.shared_prompt.GroupedPolicyBatch``) is split the same way by whole groups;
3. if the loss or the gradient norm is not finite, the update is dropped (params and optimizer
   state unchanged) and ``skipped_steps`` is incremented.

The state (``TrainState``, ``init_train_state``) is in :mod:`meljax.rl.state`, the host loop of
several updates on one rollout batch (``train_on_batch``) in :mod:`meljax.rl.passes`; both are
re-exported here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meljax.rl import logprobs
from meljax.rl import objective as losses
from meljax.rl.batch import PolicyBatch, SequenceBatch, TrainBatch
from meljax.rl.objective import LossConfig
from meljax.rl.passes import OLD_LOGPROBS, train_on_batch
from meljax.rl.shared_prompt import GroupedPolicyBatch, shared_logprobs
from meljax.rl.state import TrainState, init_train_state, split_params, train_state_shardings
from meljax.runtime import sharding as shd

# --------------------------------------------------------------------------------------------
# Batch shardings and micro-batches
# --------------------------------------------------------------------------------------------


def batch_shardings(batch, mesh: Mesh):
    """Batch-major shardings for every leaf of a batch pytree (``[B, ...]`` over data axes)."""
    return jax.tree.map(lambda x: shd.batch_sharding(mesh, np.ndim(x)), batch)


def _microbatch_sharding(mesh: Mesh | None, ndim: int, rows: int) -> NamedSharding | None:
    """Sharding of ``[m, rows, ...]`` stacked micro-batches: the row axis over the data axes."""
    if mesh is None:
        return None
    spec = shd.batch_sharding(mesh, ndim - 1).spec
    if rows % shd.data_parallel_size(mesh):
        return None  # uneven: let the compiler place it
    return NamedSharding(mesh, PartitionSpec(None, *spec))


def split_microbatches(tree, m: int, mesh: Mesh | None = None, name: str = "batch"):
    """``[B, ...]`` leaves -> ``[m, B / m, ...]``; micro-batch ``k`` holds rows ``b % m == k``.

    The strided assignment keeps every micro-batch spread evenly over a batch sharded in
    contiguous blocks, so the reshape needs no communication when ``B / (m * dp)`` is whole.
    """
    leaves = jax.tree.leaves(tree)
    rows = leaves[0].shape[0]
    if rows % m:
        raise ValueError(f"{name}: {rows} rows cannot be split into {m} micro-batches")

    def one(x):
        y = jnp.swapaxes(x.reshape(rows // m, m, *x.shape[1:]), 0, 1)
        s = _microbatch_sharding(mesh, y.ndim, rows // m)
        return y if s is None else jax.lax.with_sharding_constraint(y, s)

    return jax.tree.map(one, tree)


def merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of ``split_microbatches`` for one leaf: ``[m, B / m, ...]`` -> ``[B, ...]``."""
    m, r = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape(m * r, *x.shape[2:])


def _pick_microbatches(rows: int, wanted: int, dp: int) -> int:
    """Largest ``d <= wanted`` splitting ``rows`` evenly and keeping each split a multiple of
    ``dp`` (falls back to any divisor, then 1)."""
    for need_dp in (True, False):
        for d in range(min(wanted, rows), 0, -1):
            if rows % d == 0 and (not need_dp or (rows // d) % dp == 0):
                return d
    return 1


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def global_norm(tree) -> jax.Array:
    """L2 norm (float32 scalar) over every leaf of ``tree``."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _objective_fn(graphdef, cfg: LossConfig, kind: str) -> Callable:
    """``(params, part, den) -> (loss, metrics)`` for the policy rows or the MEL rows."""

    def fn(params, part, den):
        if isinstance(part, GroupedPolicyBatch):  # shared prompts (meljax.rl.shared_prompt)
            logp, ent = shared_logprobs((graphdef, params), part, chunk_size=cfg.logprob_chunk)
            return losses.policy_objective(logp, ent, part.flat_answers(), cfg, den)
        seq = part.seq if kind == "policy" else part
        logp, ent = logprobs.sequence_logprobs(
            (graphdef, params),
            seq,
            chunk_size=cfg.logprob_chunk,
            with_entropy=kind == "policy",
        )
        if kind == "policy":
            return losses.policy_objective(logp, ent, part, cfg, den)
        return losses.mel_loss(logp, part, cfg, den)

    return fn


def _accumulate(fn, params, data, den, m: int, mesh: Mesh | None, grad_shardings, name: str):
    """Loss, metrics and gradient of ``fn`` summed over ``m`` micro-batches of ``data``."""
    vg = jax.value_and_grad(fn, has_aux=True)
    if m == 1:
        (loss, metrics), grads = vg(params, data, den)
        return loss, metrics, grads
    mbs = split_microbatches(data, m, mesh, name)
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), mbs)
    _, metrics_shape = jax.eval_shape(fn, params, one, den)

    def constrain(g):
        return g if grad_shardings is None else jax.lax.with_sharding_constraint(g, grad_shardings)

    def body(carry, mb):
        loss_acc, met_acc, g_acc = carry
        (loss, met), g = vg(params, mb, den)
        return (loss_acc + loss, _tree_add(met_acc, met), constrain(_tree_add(g_acc, g))), None

    zeros = (
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape),
        constrain(jax.tree.map(jnp.zeros_like, params)),
    )
    (loss, metrics, grads), _ = jax.lax.scan(body, zeros, mbs)
    return loss, metrics, grads


def train_step_fn(
    state: TrainState,
    batch: TrainBatch,
    *,
    graphdef,
    optimizer: optax.GradientTransformation,
    loss_cfg: LossConfig,
    num_microbatches: int = 1,
    mesh: Mesh | None = None,
    schedule: Callable | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The (un-jitted) update; see ``make_train_step``. With a ``mesh``, activations are
    constrained batch-sharded (``sharding.use_mesh``) and gradients to the param shardings."""
    with shd.use_mesh(mesh):
        return _train_step_body(
            state, batch, graphdef, optimizer, loss_cfg, num_microbatches, mesh, schedule
        )


def _train_step_body(state, batch, graphdef, optimizer, loss_cfg, num_microbatches, mesh, schedule):
    dp = shd.data_parallel_size(mesh) if mesh is not None else 1
    grad_shardings = None
    if mesh is not None:
        grad_shardings = train_state_shardings(state.params, mesh)
    flat = batch.policy
    if isinstance(flat, GroupedPolicyBatch):
        flat = flat.flat_answers()
    den = losses.compute_denominators(batch.replace(policy=flat), loss_cfg)

    loss, metrics, grads = _accumulate(
        _objective_fn(graphdef, loss_cfg, "policy"),
        state.params,
        batch.policy,
        den,
        num_microbatches,
        mesh,
        grad_shardings,
        "policy batch",
    )
    if loss_cfg.use_mel:
        m_mel = _pick_microbatches(batch.mel.tokens.shape[0], num_microbatches, dp)
        mel_loss, mel_metrics, mel_grads = _accumulate(
            _objective_fn(graphdef, loss_cfg, "mel"),
            state.params,
            batch.mel,
            den,
            m_mel,
            mesh,
            grad_shardings,
            "mel batch",
        )
        loss = loss + mel_loss
        metrics = {**metrics, **mel_metrics}
        grads = _tree_add(grads, mel_grads)

    grad_norm = global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep_if_ok(new, old):
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    skipped = (~ok).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_if_ok(new_params, state.params),
        opt_state=keep_if_ok(new_opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + skipped,
    )
    metrics = {
        **metrics,
        "loss": loss,
        "grad_norm": grad_norm,
        "skipped": skipped,
        "skipped_steps": new_state.skipped_steps,
    }
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.num_updates), jnp.float32)
    return new_state, metrics


def _jit_for_state(impl: Callable, mesh: Mesh | None, *, donate: bool, out_batch: bool):
    """Jits ``impl(state_or_params, batch)``; with a mesh the shardings are derived from the first
    call's arguments (cached by tree structure) and outputs are the state / replicated metrics, or
    a batch-sharded array when ``out_batch``.

    The result also has ``.lower(first, batch)``: the same program lowered for (possibly
    abstract, ``jax.ShapeDtypeStruct``) arguments, e.g. to ``.compile()`` it ahead of time for
    another topology and read its ``memory_analysis()`` / ``as_text()``."""
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(impl, donate_argnums=donate_argnums)
    cache: dict = {}

    def jitted(first, batch):
        key = (jax.tree_util.tree_structure(first), jax.tree_util.tree_structure(batch))
        if key not in cache:
            s_first = train_state_shardings(first, mesh)
            s_batch = batch_shardings(batch, mesh)
            rank = 3 if isinstance(batch, GroupedPolicyBatch) else 2  # [P, G, La] or [B, T]
            out = shd.batch_sharding(mesh, rank) if out_batch else (s_first, shd.replicated(mesh))
            fn = jax.jit(
                impl,
                in_shardings=(s_first, s_batch),
                out_shardings=out,
                donate_argnums=donate_argnums,
            )
            cache[key] = (fn, s_batch)
        return cache[key]

    def call(first, batch):
        fn, s_batch = jitted(first, batch)
        return fn(first, shd.put_global(batch, s_batch))

    call.lower = lambda first, batch: jitted(first, batch)[0].lower(first, batch)
    return call


def make_train_step(
    graphdef,
    optimizer: optax.GradientTransformation,
    loss_cfg: LossConfig,
    *,
    mesh: Mesh | None = None,
    num_microbatches: int = 1,
    schedule: Callable | None = None,
    donate: bool = True,
) -> Callable[[TrainState, TrainBatch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted update ``train_step(state, batch) -> (state, metrics)``.

    Args:
      graphdef: the model's graph definition (``split_params(model)[0]``).
      optimizer: the optax optimizer that made ``state.opt_state``.
      loss_cfg: the objective.
      mesh: shard the step: state by ``train_state_shardings``, every batch array ``[B, ...]`` over
        the data axes (``B`` must be a multiple of the data-parallel size), metrics replicated.
      num_microbatches: gradient accumulation; the policy batch rows must be divisible by it
        (the MEL batch uses the largest divisor of its rows not above it).
      schedule: the learning-rate schedule, to report ``lr`` in the metrics.
      donate: donate the input state's buffers (do not reuse ``state`` after the call).

    Returns:
      ``train_step``. Metrics (float32 scalars): ``loss`` (total), ``policy_loss``, ``kl_ref``,
      ``clip_frac``, ``approx_kl``, ``entropy``, ``adv_mean``, ``reward_mean`` (GRPO) or
      ``rft_frac`` (RFT), ``mel_nll``, ``mel_rows``, ``mel_tokens`` (with MEL), ``grad_norm``
      (before clipping), ``skipped`` (this step), ``skipped_steps``, ``lr``.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    impl = functools.partial(
        train_step_fn,
        graphdef=graphdef,
        optimizer=optimizer,
        loss_cfg=loss_cfg,
        num_microbatches=num_microbatches,
        mesh=mesh,
        schedule=schedule,
    )
    return _jit_for_state(impl, mesh, donate=donate, out_batch=False)


def make_compute_logprobs(
    graphdef,
    *,
    mesh: Mesh | None = None,
    chunk_size: int = 128,
    num_microbatches: int = 1,
) -> Callable[[Any, SequenceBatch], jax.Array]:
    """Jitted ``compute_logprobs(state_or_params, seq) -> [B, T]`` float32: log-probs of
    ``seq.tokens`` under the given params, 0 off ``seq.loss_mask`` (the layout of
    ``PolicyBatch.old_logprobs`` / ``ref_logprobs``); for a ``GroupedPolicyBatch``, the answer
    tokens' ``[P, G, La]`` (each prompt's forward once, ``meljax.rl.shared_prompt``). Accepts a ``TrainState`` (its params are
    used) or a params state (e.g. a frozen reference); rows are processed in
    ``num_microbatches`` sequential chunks to bound memory."""

    def one(params, s):
        if isinstance(s, GroupedPolicyBatch):
            logp, _ = shared_logprobs(
                (graphdef, params), s, chunk_size=chunk_size, with_entropy=False
            )
            mask = jnp.asarray(s.answers.seq.loss_mask) > 0
            return jnp.where(mask, logp.reshape(mask.shape), 0.0)
        logp, _ = logprobs.sequence_logprobs(
            (graphdef, params), s, chunk_size=chunk_size, with_entropy=False
        )
        return jnp.where(jnp.asarray(s.loss_mask) > 0, logp, 0.0)

    def impl(params, seq):
        with shd.use_mesh(mesh):
            return _logprobs_body(params, seq)

    def _logprobs_body(params, seq):
        if num_microbatches == 1:
            return one(params, seq)
        # params ride in the scan carry instead of being closed over (nnx.merge inside the
        # scan then sees values of the scan's own trace).
        _, out = jax.lax.scan(
            lambda p, s: (p, one(p, s)),
            params,
            split_microbatches(seq, num_microbatches, mesh, "sequence batch"),
        )
        return merge_microbatches(out)

    jitted = _jit_for_state(impl, mesh, donate=False, out_batch=True)

    def params_of(state_or_params):
        return (
            state_or_params.params if isinstance(state_or_params, TrainState) else state_or_params
        )

    def compute_logprobs(state_or_params, seq: SequenceBatch | GroupedPolicyBatch) -> jax.Array:
        return jitted(params_of(state_or_params), seq)

    compute_logprobs.lower = lambda first, seq: jitted.lower(params_of(first), seq)
    return compute_logprobs


__all__ = [
    "OLD_LOGPROBS",
    "PolicyBatch",
    "TrainBatch",
    "TrainState",
    "batch_shardings",
    "init_train_state",
    "make_compute_logprobs",
    "make_train_step",
    "merge_microbatches",
    "split_microbatches",
    "split_params",
    "train_state_shardings",
    "train_on_batch",
    "train_step_fn",
]
