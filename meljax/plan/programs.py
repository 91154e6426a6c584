"""Which jitted programs a training run launches, at which shapes: the one place that knows.

Each :class:`Program` is built from the run's own pieces (the rollout engine with
``setup.engine_options``, the update and log-prob programs of
:func:`meljax.trainer.run.update_programs`, the batch builders) with the config's worst-case
sizes, and lowered ahead of time on abstract weights, so nothing is allocated. A new kind of
pass in :func:`meljax.trainer.run.step` needs its ``Program`` here.

Sampling passes run on the continuous-batching engine (:mod:`meljax.plan.engine_programs`): one
``rollout_weights`` program (the decode copy of the weights, once per update) and, per pass
(``rollout``, ``analysis``, ``replay``, ``eval``), its largest ``_prefill``, its slot copy
``_insert`` and one ``_decode`` segment at the largest attended length.

Worst cases (the shapes the run may reach, not the typical ones):

- rollout: ``num_questions`` prompts of up to ``data.max_prompt_tokens`` tokens, ``G`` answers
  of ``rollout.max_new_tokens``;
- MEL analysis: every question mixed, ``max_pairs_per_query`` pairs each, prompts of
  ``mel.analysis_max_prompt_tokens``, ``analyses_per_pair`` analyses per pair;
- MEL replay: one replay per analysis (``MetaConfig.max_analyses``), each prompt holding a full
  analysis and a full question plus the replay template;
- update: the policy batch in the layout ``run.update_batch`` gives the update (shared
  prompts or flat rows ``[N*G, bucket(max_prompt) + max_new_tokens]``) and the NLL batch
  with every analysis kept (``nll_bucketed`` gives smaller batches on typical steps, never a
  larger one);
- periodic evaluation: prompts assumed no longer than ``data.max_prompt_tokens``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from meljax.config.settings import settings
from meljax.data.prompts import resolve_instruction
from meljax.meta import templates
from meljax.models import ModelConfig, abstract_model
from meljax.plan.engine_programs import lower_engine_programs
from meljax.rl.batch import TrainBatch, build_policy_batch, build_sequence_batch
from meljax.rl.optim import make_optimizer
from meljax.rl.state import init_train_state, train_state_shardings
from meljax.runtime import sharding as shd
from meljax.runtime.buckets import bucket
from meljax.sampling import ContinuousEngine, SamplingParams
from meljax.trainer import setup
from meljax.trainer.run import update_batch, update_programs


@dataclasses.dataclass
class Program:
    """One jitted program of the run.

    Attributes:
      name: short name (``rollout``, ``analysis``, ``replay``, ``logprobs``, ``update`` ...).
      shapes: its sizes in words.
      lower: ``() -> jax.stages.Lowered`` (compile it to measure).
      resident_extra: names of the run's long-lived buffers (``state.params``,
        ``state.opt_state``, ``ref_params``) that are NOT arguments of this program but stay
        in device memory while it runs.
      dynamic_trip_count: iterations of its data-dependent loops at most (the decode loop).
      fix: what to change when it does not fit.
    """

    name: str
    shapes: str
    lower: Callable[[], Any]
    resident_extra: tuple[str, ...]
    dynamic_trip_count: int
    fix: str


@dataclasses.dataclass
class RunModel:
    """The run's abstract model and training state on a mesh (nothing allocated).

    ``resident`` maps each long-lived buffer to its bytes per device.
    """

    config: ModelConfig
    source: str
    graphdef: Any
    state: Any  # abstract TrainState, leaves with shardings
    ref_params: Any  # abstract reference params (kl_beta > 0) or None
    resident: dict[str, int]


def attach_shardings(tree, shardings):
    """``tree`` with every leaf a ``jax.ShapeDtypeStruct`` carrying its ``NamedSharding``
    (``shardings`` may be a prefix tree, as ``train_state_shardings`` returns)."""

    def one(sharding, sub):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), sub
        )

    return jax.tree.map(
        one, shardings, tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct`` leaves."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def build_run_model(cfg: ml_collections.ConfigDict, mesh, model_config: ModelConfig, source: str):
    """Abstract graphdef, train state (``init_train_state``, in the run's master dtype)
    and reference params on ``mesh``."""

    graphdef, params = abstract_model(model_config)
    graphdef, params = nnx.split(nnx.merge(graphdef, params), nnx.Param)
    optim = settings(cfg).optim
    optimizer, _ = make_optimizer(optim)
    state = jax.eval_shape(
        lambda p: init_train_state(p, optimizer, mesh, master_dtype=optim.master_dtype), params
    )
    state = attach_shardings(state, train_state_shardings(state, mesh))
    ref = state.params if cfg.algorithm.kl_beta > 0 else None
    resident = {
        "state.params": bytes_per_device(state.params),
        "state.opt_state": bytes_per_device(state.opt_state),
    }
    if ref is not None:
        resident["ref_params"] = resident["state.params"]
    return RunModel(model_config, source, graphdef, state, ref, resident)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def replay_prompt_bound(cfg: ml_collections.ConfigDict) -> int:
    """Most tokens a replay prompt can have: a full analysis, a full question and the template
    text (its characters bound its tokens)."""
    template = templates.load_template(
        cfg.mel.replay_template or None,
        default=templates.DEFAULT_REPLAY_TEMPLATE,
        required=templates.REPLAY_FIELDS,
        what="replay_template",
    )
    fixed = len(re.sub(r"\{\w+\}", "", template)) + len(resolve_instruction(cfg.data.instruction))
    return cfg.mel.analysis_max_new_tokens + cfg.data.max_prompt_tokens + fixed


def run_programs(cfg: ml_collections.ConfigDict, mesh, run: RunModel) -> list[Program]:
    """Every jitted program ``meljax train`` launches with ``cfg`` on ``mesh``, worst case."""

    dp = shd.data_parallel_size(mesh)
    s = settings(cfg, dp)
    graphdef, params = run.graphdef, run.state.params
    r = cfg.rollout
    # token ids do not change shapes
    engine = ContinuousEngine(
        graphdef, stop_token_ids=[0], pad_id=0, mesh=mesh, **setup.engine_options(s)
    )
    all_resident = tuple(run.resident)
    not_params = tuple(k for k in all_resident if k != "state.params")
    programs: list[Program] = []

    def engine_programs(name, prompts, prompt_len, sampling: SamplingParams, why, fix):
        progs = lower_engine_programs(engine, params, prompts, prompt_len, sampling)
        for part in ("prefill", "insert", "decode"):
            ep = progs[part]
            programs.append(
                Program(
                    name=f"{name}_{part}",
                    shapes=f"{ep.shapes}; {why}",
                    lower=ep.lower,
                    # the training weights and moments wait; the decode copy is an argument
                    resident_extra=all_resident,
                    dynamic_trip_count=ep.max_trip_count,
                    fix=fix,
                )
            )
        return progs["weights"]

    kv = "rollout.cache_dtype=bfloat16"
    slots = "rollout.max_slots or rollout.kv_budget_gib"
    weights = engine_programs(
        "rollout",
        r.num_questions,
        cfg.data.max_prompt_tokens,
        s.rollout.sampling(),
        "rollout",
        f"fewer slots ({slots}), lower rollout.max_new_tokens, {kv}, or more devices",
    )
    programs.insert(
        0,
        Program(
            name="rollout_weights",
            shapes=weights.shapes,
            lower=weights.lower,
            resident_extra=not_params,
            dynamic_trip_count=1,
            fix="rollout.tensor_parallel > 1 (weights split within a replica), or more devices",
        ),
    )
    meta = s.mel
    pairs = meta.max_pairs_per_query * r.num_questions
    if cfg.mel.enabled:
        engine_programs(
            "analysis",
            pairs,
            meta.analysis_max_prompt_tokens,
            meta.analysis_sampling(),
            "MEL analysis pass, every question mixed",
            "lower mel.max_pairs_per_query, mel.analysis_max_prompt_tokens (a bucket edge such "
            f"as 4096 rather than just above one), mel.analysis_max_new_tokens, {slots}, or {kv}",
        )
        engine_programs(
            "replay",
            meta.max_analyses(r.num_questions),
            replay_prompt_bound(cfg),
            meta.replay_sampling(),
            "MEL replay pass, every analysis replayed",
            f"lower mel.replay_max_new_tokens or mel.max_pairs_per_query, {slots}, or {kv}",
        )

    # the update's batches, built by the trainer's own builders (worst case: longest prompts
    # and answers), in the layout the update consumes (update_batch: shared prompts or flat)
    rows, g = r.num_questions * r.group_size, r.group_size
    seq_len = bucket(cfg.data.max_prompt_tokens) + r.max_new_tokens
    policy = build_policy_batch(
        [[1] * cfg.data.max_prompt_tokens] * rows,
        [[1] * r.max_new_tokens] * rows,
        advantages=np.zeros(rows),
        rewards=np.zeros(rows),
        group_index=np.arange(rows) // g,
        old_logprobs=None,
        batch_multiple=dp,
        max_len=seq_len,
    )
    policy, shared = update_batch(s, policy, dp)
    if cfg.mel.enabled:
        nll = build_sequence_batch(
            [],
            [],
            min_rows=meta.nll_min_rows(r.num_questions),
            batch_multiple=dp,
            max_len=meta.nll_length,
        )
    else:  # the all-padding NLL batch the loop passes without MEL
        nll = build_sequence_batch([], [], min_rows=dp, batch_multiple=dp, max_len=bucket(1))
    batch = _abstract(TrainBatch(policy=policy, mel=nll))
    fns = update_programs(s, graphdef, mesh)
    micro = cfg.algorithm.num_microbatches
    if shared:  # prompts [P, Lp] once, answers [P, G, La]
        groups, lp = batch.policy.prompt_tokens.shape
        la = batch.policy.answers.seq.tokens.shape[-1]
        policy_rows = groups * g
        layout = f"[{groups}, {lp}] prompts + [{groups}, {g}, {la}] answers"
        logprob_input = batch.policy
    else:
        policy_rows, t = batch.policy.seq.tokens.shape
        layout = f"[{policy_rows}, {t}]"
        logprob_input = batch.policy.seq

    if cfg.algorithm.kl_beta > 0 or cfg.algorithm.old_logprobs == "recompute":
        logprobs = fns.compute_logprobs
        first = run.ref_params if run.ref_params is not None else params
        uses = "reference (algorithm.kl_beta > 0)" if run.ref_params is not None else "old"
        programs.append(
            Program(
                name="logprobs",
                shapes=f"{layout} {uses} log-probs",
                lower=lambda: logprobs.lower(first, logprob_input),
                resident_extra=tuple(k for k in all_resident if k != "ref_params")
                if run.ref_params is not None
                else not_params,
                dynamic_trip_count=1,
                fix="lower algorithm.logprob_chunk or rollout.max_new_tokens, or more devices",
            )
        )

    train_step = fns.train_step
    nll_rows, nll_t = batch.mel.tokens.shape
    programs.append(
        Program(
            name="update",
            shapes=(
                f"policy {layout} in {micro} micro-batches of {policy_rows // micro} "
                f"rows, NLL [{nll_rows}, {nll_t}]"
            ),
            lower=lambda: train_step.lower(run.state, batch),
            resident_extra=tuple(k for k in all_resident if k == "ref_params"),
            dynamic_trip_count=1,
            fix=(
                "raise algorithm.num_microbatches, lower algorithm.logprob_chunk, shorten "
                "rollout.max_new_tokens / mel.analysis_max_prompt_tokens, or shard over more "
                "devices (mesh.fsdp)"
            ),
        )
    )

    if cfg.eval.every_steps:
        e = cfg.eval
        # greedy (G = 1) and sampled requests share one engine run; its largest refill is
        # every slot taking a greedy request
        greedy = SamplingParams(e.max_new_tokens, temperature=0.0, num_samples=1)
        engine_programs(
            "eval",
            engine.pool_shape(engine.max_slots or 1, cfg.data.max_prompt_tokens, 1)[0],
            cfg.data.max_prompt_tokens,
            greedy,
            "periodic evaluation (prompts assumed <= data.max_prompt_tokens)",
            f"lower eval.max_new_tokens, {slots}",
        )
    return programs


__all__ = [
    "Program",
    "RunModel",
    "attach_shardings",
    "build_run_model",
    "bytes_per_device",
    "replay_prompt_bound",
    "run_programs",
]
