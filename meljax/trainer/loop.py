"""The main job: batch of questions -> rollouts -> rewards -> meta-experiences -> update.

Everything a step draws at random derives from ``(config.seed, step)`` and the data iterator's
state is checkpointed with the weights, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from meljax import files, heldout, multihost
from meljax import sharding as shd
from meljax.batch import TrainBatch, build_sequence_batch
from meljax.buckets import bucket
from meljax.config import config_from_json, settings
from meljax.meta import META_LOG_FILE, MetaExperiencePipeline
from meljax.meta.lessons import overhead_line
from meljax.models import save_pretrained
from meljax.optim import make_optimizer
from meljax.train_step import (
    make_compute_logprobs,
    make_train_step,
    train_on_batch,
)
from meljax.trainer import setup
from meljax.trainer import workdir as run_folder
from meljax.trainer.checkpointing import CONFIG_FILE, Checkpointer, checkpoint_dir
from meljax.trainer.metrics import MetricsWriter, Progress, read_metrics
from meljax.trainer.rollout import run_rollouts
from meljax.trainer.stop import Preempted, StopSignal
from meljax.trainer.wandb_log import build_loggers

EXPORT_DIR = "export"


@dataclasses.dataclass
class TrainSummary:
    workdir: str
    start_step: int
    final_step: int
    records: list[dict]
    export_dir: str | None

    def describe(self) -> str:
        lines = [f"run folder: {self.workdir}"]
        if self.start_step >= self.final_step:
            lines.append(f"nothing to do: already at step {self.final_step}")
        rows = [r for r in self.records if r.get("reward_mean") is not None]
        if rows:
            curve = " ".join(f"{r['reward_mean']:.2f}" for r in rows)
            kept = int(sum(r.get("mel/kept") or 0 for r in rows))
            made = int(sum(r.get("mel/generated") or 0 for r in rows))
            lines.append(f"starting accuracy (step {rows[0]['step']}): {rows[0]['accuracy']:.3f}")
            lines.append(f"reward curve (mean reward per step): {curve}")
            if made:
                lines.append(
                    f"meta-experiences kept / generated: {kept} / {made} "
                    f"(retention ratio {kept / made:.3f})"
                )
            overhead = overhead_line(rows)
            if overhead:
                lines.append(overhead)
        w = self.workdir
        lines += [
            f"metrics:          {files.path(w, 'metrics.jsonl')}",
            f"meta-experiences: {files.path(w, META_LOG_FILE)}",
            f"checkpoints:      {files.path(w, 'checkpoints')}",
        ]
        if self.export_dir:
            lines.append(f"exported model:   {self.export_dir}")
        return "\n".join(lines)


class PeriodicEval:
    """Evaluation on the configured benchmarks during training (``eval.every_steps`` and
    ``eval.at_start``): the run's own policy and verifier, so prompts, stops and verdicts are
    those of the rollouts. Reports go to ``WORKDIR/eval/step_N.json``."""

    def __init__(self, cfg, workdir, policy, verifier, eval_config):
        from meljax import evaluation

        self.cfg, self.workdir, self.policy, self.verifier = cfg, workdir, policy, verifier
        self.config = eval_config
        specs = evaluation.parse_benchmark_specs(eval_config.benchmarks)
        self.benchmarks, _ = evaluation.load_benchmarks(
            specs, limit=eval_config.limit, on_bad_row=cfg.data.on_bad_row
        )

    def __call__(self, step: int, params) -> dict[str, float]:
        from meljax import evaluation

        lead = jax.process_index() == 0
        if lead:  # minutes on a CPU: say what the silence is
            print(f"held-out evaluation, step {step} ...", flush=True)
        start = time.perf_counter()
        self.policy.set_params(params)
        report = evaluation.evaluate(
            self.policy,
            self.verifier,
            self.benchmarks,
            self.config,
            seed=self.cfg.seed + step,
            progress=False,
            meta={"step": step},
        )
        self.policy.clear_params()
        if lead:
            report.write(str(files.path(self.workdir, "eval", f"step_{step}.json")))
        out = {}
        for name, m in list(report.benchmarks.items()) + [("average", report.average)]:
            for k, v in m.to_json().items():
                if isinstance(v, int | float) and k != "num_samples":
                    out[f"eval/{name}/{k}"] = float(v)
                elif k.endswith("_ci95") and v:
                    out[f"eval/{name}/{k[: -len('_ci95')]}_ci_low"] = float(v[0])
                    out[f"eval/{name}/{k[: -len('_ci95')]}_ci_high"] = float(v[1])
        if lead:
            average = heldout.from_metrics(step, out).get("average")
            summary = average.text() if average is not None else "no problems"
            print(
                f"held-out evaluation, step {step}: {summary} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        return out


def _scalars(metrics: list[dict]) -> dict[str, float]:
    """Update metrics (device scalars) of the step's last update, on the host."""
    last = shd.to_host(metrics[-1])
    return {f"train/{k}": float(np.asarray(v)) for k, v in last.items()}


def _export(graphdef, params, tokenizer, workdir: str, dtype: str, is_chief: bool) -> str:
    """``WORKDIR/export`` (a Hugging Face folder), staged locally for a remote workdir.

    The folder is the run's own: a rerun or resume replaces the model files in it (see
    ``save_pretrained``'s ``adopt``) and keeps anything else put there.
    """
    target = files.path(workdir, EXPORT_DIR)
    model = nnx.merge(graphdef, params)
    if files.is_local(workdir):
        save_pretrained(
            model, str(target), tokenizer=tokenizer, dtype=dtype or None, overwrite=True, adopt=True
        )
        return str(target)
    staging = tempfile.mkdtemp(prefix="meljax-export-")
    try:
        save_pretrained(model, staging, tokenizer=tokenizer, dtype=dtype or None)
        if is_chief:
            files.copy_tree(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def train(
    cfg: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> TrainSummary:
    """Runs (or resumes) training until ``cfg.total_steps``; returns a summary. The workdir
    is locked for the run; resuming with a config that shapes the run differently is refused
    unless ``allow_config_change`` (see :mod:`meljax.trainer.workdir`).

    Raises:
      Preempted: on SIGTERM, after saving a checkpoint (see :class:`StopSignal`).
      ValueError: the workdir is in use, or its run was made with another config.
    """
    files.path(workdir).mkdir(parents=True, exist_ok=True)
    with run_folder.hold(workdir):
        return _train(cfg, workdir, allow_config_change)


def _train(cfg: ml_collections.ConfigDict, workdir: str, allow_config_change: bool):
    is_chief = jax.process_index() == 0
    ckpt = Checkpointer(
        checkpoint_dir(workdir, cfg.checkpoint.directory), max_to_keep=cfg.checkpoint.max_to_keep
    )
    changes = run_folder.on_process_0(  # before anything is built: a changed model fails late
        lambda: run_folder.check_config_changes(
            workdir, cfg, ckpt.latest_step(), allow_config_change
        )
    )
    mesh = setup.build_mesh(cfg)
    dp = shd.data_parallel_size(mesh)
    s = settings(cfg, data_parallel=dp)
    model, tokenizer = setup.build_model_and_tokenizer(cfg, mesh=mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    del model

    optimizer, schedule = make_optimizer(s.optim)
    state = setup.init_state(cfg, params, optimizer, mesh)
    ref_params = (
        jax.tree.map(lambda x: x.copy(), state.params) if cfg.algorithm.kl_beta > 0 else None
    )
    del params
    train_step = make_train_step(
        graphdef,
        optimizer,
        s.loss,
        mesh=mesh,
        num_microbatches=s.update.num_microbatches,
        schedule=schedule,
    )
    compute_logprobs = make_compute_logprobs(
        graphdef, mesh=mesh, chunk_size=s.loss.logprob_chunk_size
    )
    policy = setup.build_policy(cfg, graphdef, tokenizer, mesh)
    source, skipped_rows = setup.build_problem_source(cfg)
    data_iter = setup.build_data_iterator(cfg, source)

    writer = MetricsWriter(
        workdir,
        is_chief=is_chief,
        tensorboard=s.logging.tensorboard,
        loggers=build_loggers(cfg, workdir, is_chief=is_chief),
    )
    start, state, extra = ckpt.restore_latest(state)  # a corrupt latest one: the one before
    if start:
        data_iter.set_state(extra["data_iterator"])
        logging.info("resumed from step %d in %s", start, workdir)
    # Records written after the checkpoint we resume from are redone: drop them (a step-0
    # evaluation too when nothing was saved yet: it is redone as well).
    writer.truncate_after(start if start else -1)
    if is_chief:
        files.truncate_jsonl(
            files.path(workdir, META_LOG_FILE), lambda r: r.get("step", 0) <= start
        )
        run_folder.record_config(workdir, cfg, changes, start)
        if skipped_rows:
            logging.warning("data: %d bad rows skipped", skipped_rows)

    verifier = setup.build_verifier(cfg)
    pipeline = None
    if s.loss.use_mel:
        pipeline = MetaExperiencePipeline(
            policy=policy, verifier=verifier, config=s.meta, workdir=workdir, is_chief=is_chief
        )
    # Without MEL the update still takes a (tiny, all-padding) NLL batch: one code path.
    no_mel = build_sequence_batch(
        [], [], pad_id=policy.pad_id, min_rows=dp, batch_multiple=dp, max_len=bucket(1)
    )
    evaluator = None
    if s.eval.every_steps or s.eval.at_start:
        evaluator = PeriodicEval(cfg, workdir, policy, verifier, s.eval)
    if is_chief:  # the rollout's slot pool, sized from rollout.max_slots / kv_budget_gib
        r = s.rollout
        pool = policy.engine.describe(
            r.num_questions * r.group_size, s.prompt.max_prompt_tokens or 512, r.max_new_tokens
        )
        logging.info("rollout engine: %s", pool)
        print(f"rollout engine: {pool}", flush=True)
    base_key = jax.random.key(cfg.seed)
    progress = Progress(start, cfg.total_steps, s.logging.progress_bar, s.logging.log_every)
    stop = StopSignal()
    saved = start

    def save(step: int, iterator_state) -> None:
        nonlocal saved
        ckpt.save(
            step, state, {"data_iterator": iterator_state, "config": cfg.to_json(), "step": step}
        )
        saved = step

    try:
        if evaluator is not None and s.eval.at_start and start == 0:
            t_eval = time.perf_counter()
            metrics = evaluator(0, state.params)
            writer.write(0, metrics | {"time/eval": time.perf_counter() - t_eval})
        for step in range(start + 1, cfg.total_steps + 1):
            t_step = time.perf_counter()
            k_rollout, k_meta = jax.random.split(jax.random.fold_in(base_key, step))
            before = data_iter.get_state()
            problems = next(data_iter)
            policy.set_params(state.params)
            ro = run_rollouts(
                policy=policy,
                verifier=verifier,
                problems=problems,
                sampling=s.rollout.sampling(),
                key=k_rollout,
                advantage=s.loss.advantage,
                adv_eps=s.loss.adv_eps,
                batch_multiple=dp,
            )
            if stop.requested():
                raise _Abandon(step, before)
            metrics = ro.metrics()
            timings = {f"time/{k}": v for k, v in ro.timings.items()}
            mel_batch, statuses = no_mel, []
            if pipeline is not None:
                meta = pipeline.run(
                    step, problems, ro.texts, ro.rewards, s.rollout.group_size, k_meta
                )
                mel_batch = meta.batch
                statuses = [r["status"] for r in meta.records]
                metrics.update(meta.metrics())
                metrics["retention_ratio"] = meta.retention_ratio
                timings["time/meta_analysis"] = meta.timings.get("analysis_s", 0.0)
                timings["time/meta_replay"] = meta.timings.get("replay_s", 0.0)
            policy_batch = ro.batch
            multihost.check_agreement(
                f"step {step}",
                {
                    "rewards": ro.rewards,
                    "policy batch": jax.tree.leaves(policy_batch),
                    "meta-experiences": statuses,
                    "NLL batch": jax.tree.leaves(mel_batch),
                },
            )
            if stop.requested():
                raise _Abandon(step, before)
            if ref_params is not None:
                policy_batch = policy_batch.replace(
                    ref_logprobs=compute_logprobs(ref_params, policy_batch.seq)
                )
            policy.clear_params()  # the decode copy of the weights is not needed by the update
            t_update = time.perf_counter()
            state, updates = train_on_batch(
                state,
                TrainBatch(policy=policy_batch, mel=mel_batch),
                train_step,
                num_passes=s.update.num_passes,
                old_logprobs=s.update.old_logprobs,
                compute_logprobs=compute_logprobs,
            )
            metrics.update(_scalars(updates))
            timings["time/update"] = time.perf_counter() - t_update
            timings["time/step"] = time.perf_counter() - t_step
            metrics["rollout_tokens_per_s"] = metrics["rollout_tokens"] / max(
                ro.timings["rollout"], 1e-9
            )
            train_tokens = float(
                np.asarray(policy_batch.seq.kv_mask).sum() + np.asarray(mel_batch.kv_mask).sum()
            )
            metrics["update_tokens_per_s"] = train_tokens / max(timings["time/update"], 1e-9)
            if (
                evaluator is not None
                and s.eval.every_steps
                and (step % s.eval.every_steps == 0 or step == cfg.total_steps)
            ):
                t_eval = time.perf_counter()
                metrics.update(evaluator(step, state.params))
                timings["time/eval"] = time.perf_counter() - t_eval
            metrics.update(timings)
            writer.write(step, metrics)
            progress.update(step, cfg.total_steps, metrics)
            stopping = stop.requested()
            if step % s.checkpoint.every_steps == 0 or step == cfg.total_steps or stopping:
                save(step, data_iter.get_state())
            if stopping:
                raise Preempted(step, step, workdir)
    except _Abandon as a:
        # The step is dropped; its records (if any) are truncated away on resume.
        if a.step - 1 > saved:
            save(a.step - 1, a.iterator_state)
        raise Preempted(a.step, saved, workdir) from None
    finally:
        stop.close()
        progress.close()
        verifier.close()
        writer.close()
        ckpt.close()
    export_dir = None
    if s.export.at_end and cfg.total_steps > start:
        export_dir = _export(graphdef, state.params, tokenizer, workdir, s.export.dtype, is_chief)
    return TrainSummary(
        workdir=workdir,
        start_step=start,
        final_step=cfg.total_steps,
        records=read_metrics(workdir) if is_chief else [],
        export_dir=export_dir,
    )


class _Abandon(Exception):
    def __init__(self, step: int, iterator_state):
        self.step, self.iterator_state = step, iterator_state


def load_config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
    return config_from_json(files.path(workdir, CONFIG_FILE).read_text())
