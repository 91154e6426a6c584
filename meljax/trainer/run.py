"""One run, one step: :func:`build_run` assembles a run from its settings, once; :func:`step`
runs one training step (rollout -> reward -> meta-experience -> update).

``meljax train`` (:mod:`meljax.trainer.loop`), ``meljax plan`` (through :func:`update_programs`),
the benchmarks and the end-to-end tests all build a run here: a change to what a run is made of
is made in this file only.

Everything a step draws at random derives from the key it is given, so a resumed run that
passes the same keys repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from meljax.config.schema import from_section
from meljax.config.sections import MeshConfig
from meljax.config.settings import Settings, settings
from meljax.meta import MetaExperiencePipeline
from meljax.rl import shared_prompt
from meljax.rl.batch import SequenceBatch, TrainBatch, build_sequence_batch
from meljax.rl.optim import make_optimizer
from meljax.rl.rollout import Rollouts, Shaping, run_rollouts
from meljax.rl.state import init_train_state
from meljax.rl.update import make_compute_logprobs, make_train_step, train_on_batch
from meljax.runtime import multihost
from meljax.runtime import sharding as shd
from meljax.runtime.buckets import bucket
from meljax.trainer import setup


@dataclasses.dataclass
class UpdateFunctions:
    """The jitted update side of a run: what :func:`build_run` and ``meljax plan`` share."""

    optimizer: Any  # optax.GradientTransformation
    schedule: Callable[[Any], Any]  # step -> learning rate
    train_step: Callable  # (TrainState, TrainBatch) -> (TrainState, metrics)
    compute_logprobs: Callable  # (params, SequenceBatch) -> [B, T] float32


def update_programs(s: Settings, graphdef, mesh, *, donate: bool = True) -> UpdateFunctions:
    """The optimizer, the jitted update and the log-prob pass of a run with settings ``s``."""
    optimizer, schedule = make_optimizer(s.optim)
    train_step = make_train_step(
        graphdef,
        optimizer,
        s.loss,
        mesh=mesh,
        num_microbatches=s.update.num_microbatches,
        schedule=schedule,
        donate=donate,
    )
    compute_logprobs = make_compute_logprobs(graphdef, mesh=mesh, chunk_size=s.loss.logprob_chunk)
    return UpdateFunctions(optimizer, schedule, train_step, compute_logprobs)


@dataclasses.dataclass
class Run:
    """Everything a run is made of (built once by :func:`build_run`). ``state`` is the freshly
    initialised train state; the loop replaces it with a restored one when it resumes."""

    cfg: ml_collections.ConfigDict
    settings: Settings
    mesh: Any
    graphdef: Any
    tokenizer: Any
    fns: UpdateFunctions
    state: Any  # TrainState
    ref_params: Any  # frozen reference weights (algorithm.kl_beta > 0) or None
    policy: Any  # meljax.sampling.policy.Policy
    verifier: Any  # meljax.rewards.Verifier
    pipeline: MetaExperiencePipeline | None  # None without MEL
    no_mel: SequenceBatch  # the all-padding NLL batch of a step without meta-experiences
    data_iter: Any  # batches of rollout.num_questions problems, checkpointable state
    skipped_rows: int  # bad data rows skipped on load

    @property
    def data_parallel(self) -> int:
        return shd.data_parallel_size(self.mesh)

    def rollout(self, weights, problems, key) -> Rollouts:
        """G answers per question sampled with ``weights`` (``policy.prepare(params)``),
        scored, as a policy batch. With
        ``rollout.dynamic_sampling`` further questions come from the run's data iterator (so a
        resumed run draws the same ones)."""
        s, r = self.settings, self.settings.rollout
        return run_rollouts(
            policy=self.policy,
            weights=weights,
            verifier=self.verifier,
            problems=problems,
            sampling=r.sampling(),
            key=key,
            advantage=s.loss.advantage,
            adv_eps=s.loss.adv_eps,
            batch_multiple=self.data_parallel,
            shaping=Shaping(
                overlong_buffer=r.overlong_buffer,
                overlong_penalty=r.overlong_penalty,
                dynamic_sampling=r.dynamic_sampling,
                max_rounds=r.max_sampling_rounds,
            ),
            more_problems=lambda: next(self.data_iter),
        )

    def meta(self, weights, step_num: int, problems, rewards, texts, key):
        """The meta-experiences of a step (``MetaResult``), or None without MEL; analyses and
        replays sample with the step's decode ``weights``."""
        if self.pipeline is None:
            return None
        g = self.settings.rollout.group_size
        return self.pipeline.run(weights, step_num, problems, texts, rewards, g, key)

    def update(self, state, policy_batch, mel_batch):
        """The step's update(s) on one rollout batch; ``(state, metrics of each update)``."""
        s = self.settings
        policy_batch, shared = update_batch(s, policy_batch, self.data_parallel)
        if self.ref_params is not None:
            policy_batch = shared_prompt.with_ref_logprobs(
                policy_batch, self.fns.compute_logprobs, self.ref_params
            )
        state, metrics = train_on_batch(
            state,
            TrainBatch(policy=policy_batch, mel=mel_batch),
            self.fns.train_step,
            num_passes=s.update.num_passes,
            old_logprobs=s.update.old_logprobs,
            compute_logprobs=self.fns.compute_logprobs,
        )
        if s.update.share_prompt:  # train/shared_prompt: 0 when the batch fell back to flat
            metrics[-1] = {**metrics[-1], "shared_prompt": np.float32(shared)}
        return state, metrics

    def close(self) -> None:
        self.verifier.close()


def update_batch(s: Settings, policy_batch, data_parallel: int):
    """``(batch, shared)``: the rollout batch as the update consumes it (``meljax plan``
    lowers the same): grouped, each prompt once (``algorithm.share_prompt``), where
    :func:`~meljax.rl.shared_prompt.maybe_group` finds whole groups that split over the
    data-parallel devices and micro-batches without adding answer rows; else flat."""
    return shared_prompt.maybe_group(
        policy_batch,
        s.update.share_prompt,
        s.rollout.group_size,
        batch_multiple=data_parallel * s.update.num_microbatches,
    )


def build_run(
    cfg: ml_collections.ConfigDict,
    workdir: str | None,
    *,
    is_chief: bool = True,
    donate: bool = True,
) -> Run:
    """Assembles the run ``cfg`` describes: mesh, model and tokenizer, train state, jitted
    update, policy (the rollout engine), verifier, MEL pipeline (writing its log under
    ``workdir``) and data iterator. ``donate=False`` keeps ``state`` valid after an update
    (benchmarks that update twice from one state)."""
    mesh = setup.build_mesh(from_section(MeshConfig, "mesh", cfg))
    dp = shd.data_parallel_size(mesh)
    s = settings(cfg, data_parallel=dp)  # the typed sections, once; each piece takes its own
    model, tokenizer = setup.build_model_and_tokenizer(s.model, s.random, s.run.seed, mesh=mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    del model
    fns = update_programs(s, graphdef, mesh, donate=donate)
    state = init_train_state(params, fns.optimizer, mesh, master_dtype=s.optim.master_dtype)
    del params
    ref_params = jax.tree.map(lambda x: x.copy(), state.params) if s.loss.kl_beta > 0 else None
    policy = setup.build_policy(s, graphdef, tokenizer, mesh)
    source, skipped_rows = setup.build_problem_source(s.data, s.run.seed)  # a bad data file
    data_iter = setup.build_data_iterator(s.data, s.rollout, s.run.seed, source)  # fails first
    verifier = setup.build_verifier(s)
    pipeline = None
    if s.loss.use_mel:
        pipeline = MetaExperiencePipeline(
            policy=policy, verifier=verifier, config=s.mel, workdir=workdir, is_chief=is_chief
        )
    # Without MEL the update still takes a (tiny, all-padding) NLL batch: one code path.
    no_mel = build_sequence_batch(
        [], [], pad_id=policy.pad_id, min_rows=dp, batch_multiple=dp, max_len=bucket(1)
    )
    return Run(
        cfg,
        s,
        mesh,
        graphdef,
        tokenizer,
        fns,
        state,
        ref_params,
        policy,
        verifier,
        pipeline,
        no_mel,
        data_iter,
        skipped_rows,
    )


class Interrupted(Exception):
    """A stop was requested between two phases of a step; the step is dropped whole."""


@dataclasses.dataclass
class StepRecord:
    """What one step reports: ``metrics`` (rewards, MEL counts, ``train/*`` of the last
    update, ``time/*`` in seconds, throughput) and the MEL statuses of its pairs."""

    metrics: dict[str, float]
    statuses: list[str]


def step(
    run: Run,
    state,
    problems,
    key: jax.Array,
    step_num: int,
    *,
    stop_requested: Callable[[], bool] = lambda: False,
):
    """One training step: ``(state, StepRecord)``.

    Raises:
      Interrupted: ``stop_requested()`` became true before the update (nothing was changed).
    """
    t_step = time.perf_counter()
    k_rollout, k_meta = jax.random.split(key)
    weights = jax.block_until_ready(run.policy.prepare(state.params))  # the decode copy
    timings = {"time/decode_weights": time.perf_counter() - t_step}
    ro = run.rollout(weights, problems, k_rollout)
    if stop_requested():
        raise Interrupted
    metrics = ro.metrics()
    timings.update({f"time/{k}": v for k, v in ro.timings.items()})
    meta = run.meta(weights, step_num, ro.problems, ro.rewards, ro.texts, k_meta)
    mel_batch, statuses = run.no_mel, []
    if meta is not None:
        mel_batch = meta.batch
        statuses = [r["status"] for r in meta.records]
        metrics.update(meta.metrics())
        metrics["retention_ratio"] = meta.retention_ratio
        timings["time/meta_analysis"] = meta.timings.get("analysis_s", 0.0)
        timings["time/meta_replay"] = meta.timings.get("replay_s", 0.0)
        timings["time/meta_other"] = meta.timings.get("total_s", 0.0) - sum(
            meta.timings.get(k, 0.0) for k in ("analysis_s", "replay_s")
        )
    multihost.check_agreement(
        f"step {step_num}",
        {
            "rewards": ro.rewards,
            "policy batch": jax.tree.leaves(ro.batch),
            "meta-experiences": statuses,
            "NLL batch": jax.tree.leaves(mel_batch),
        },
    )
    if stop_requested():
        raise Interrupted
    del weights  # the decode copy is not needed by the update: free it first
    t_update = time.perf_counter()
    state, updates = run.update(state, ro.batch, mel_batch)
    metrics.update(_scalars(updates))
    timings["time/update"] = time.perf_counter() - t_update
    timings["time/step"] = time.perf_counter() - t_step
    # host work between the timed phases: prompt encoding, advantages and batches, checks
    timings["time/other"] = timings["time/step"] - sum(
        v for k, v in timings.items() if k != "time/step"
    )
    metrics["rollout_tokens_per_s"] = metrics["rollout_tokens"] / max(ro.timings["rollout"], 1e-9)
    train_tokens = float(
        np.asarray(ro.batch.seq.kv_mask).sum() + np.asarray(mel_batch.kv_mask).sum()
    )
    metrics["update_tokens_per_s"] = train_tokens / max(timings["time/update"], 1e-9)
    metrics.update(timings)
    return state, StepRecord(metrics, statuses)


def _scalars(metrics: list[dict]) -> dict[str, float]:
    """Update metrics (device scalars) of the step's last update, on the host."""
    last = shd.to_host(metrics[-1])
    return {f"train/{k}": float(np.asarray(v)) for k, v in last.items()}
