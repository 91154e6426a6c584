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
from absl import logging
from flax import nnx

from meljax import evaluation
from meljax.config.settings import config_from_json
from meljax.meta import META_LOG_FILE
from meljax.meta.lessons import overhead_line
from meljax.models import save_pretrained
from meljax.report import heldout
from meljax.runtime import files, platform
from meljax.trainer import workdir as run_folder
from meljax.trainer.checkpointing import CONFIG_FILE, Checkpointer, checkpoint_dir
from meljax.trainer.metrics import MetricsWriter, Progress, read_metrics
from meljax.trainer.run import Interrupted, build_run, step
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

        self.cfg, self.workdir, self.policy, self.verifier = cfg, workdir, policy, verifier
        self.config = eval_config
        specs = evaluation.parse_benchmark_specs(eval_config.benchmarks)
        self.benchmarks, _ = evaluation.load_benchmarks(
            specs, limit=eval_config.limit, on_bad_row=cfg.data.on_bad_row
        )

    def __call__(self, step: int, params) -> dict[str, float]:

        lead = jax.process_index() == 0
        if lead:  # minutes on a CPU: say what the silence is
            print(f"held-out evaluation, step {step} ...", flush=True)
        start = time.perf_counter()
        report = evaluation.evaluate(
            self.policy,
            self.policy.prepare(params),
            self.verifier,
            self.benchmarks,
            self.config,
            seed=self.cfg.seed + step,
            progress=False,
            meta={"step": step},
        )
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
    run = build_run(cfg, workdir, is_chief=is_chief)
    s, data_iter = run.settings, run.data_iter
    writer = MetricsWriter(
        workdir,
        is_chief=is_chief,
        tensorboard=s.logging.tensorboard,
        loggers=build_loggers(cfg, workdir, is_chief=is_chief),
    )
    start, state, extra = ckpt.restore_latest(run.state)  # a corrupt latest one: the one before
    run.state = None  # the loop's ``state`` is the only live one (the update donates it)
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
        if run.skipped_rows:
            logging.warning("data: %d bad rows skipped", run.skipped_rows)

    evaluator = None
    if s.eval.every_steps or s.eval.at_start:
        evaluator = PeriodicEval(cfg, workdir, run.policy, run.verifier, s.eval)
    if is_chief:  # the platform's defaults, and the rollout's slot pool
        device = run.mesh.devices.flat[0]
        print(f"platform profile: {platform.profile(device.platform).describe()}", flush=True)
        r = s.rollout
        pool = run.policy.engine.describe(
            r.num_questions * r.group_size, s.prompt.max_prompt_tokens or 512, r.max_new_tokens
        )
        logging.info("rollout engine: %s", pool)
        print(f"rollout engine: {pool}", flush=True)
    base_key = jax.random.key(cfg.seed)
    progress = Progress(start, cfg.total_steps, s.logging.progress_bar, s.logging.log_every)
    stop = StopSignal()
    saved = start

    def save(step_num: int, iterator_state) -> None:
        nonlocal saved
        ckpt.save(
            step_num,
            state,
            {"data_iterator": iterator_state, "config": cfg.to_json(), "step": step_num},
        )
        saved = step_num

    try:
        if evaluator is not None and s.eval.at_start and start == 0:
            t_eval = time.perf_counter()
            metrics = evaluator(0, state.params)
            writer.write(0, metrics | {"time/eval": time.perf_counter() - t_eval})
        for step_num in range(start + 1, cfg.total_steps + 1):
            before = data_iter.get_state()
            problems = next(data_iter)
            key = jax.random.fold_in(base_key, step_num)
            try:
                state, record = step(
                    run, state, problems, key, step_num, stop_requested=stop.requested
                )
            except Interrupted:
                raise _Abandon(step_num, before) from None
            metrics = record.metrics
            if (
                evaluator is not None
                and s.eval.every_steps
                and (step_num % s.eval.every_steps == 0 or step_num == cfg.total_steps)
            ):
                t_eval = time.perf_counter()
                metrics.update(evaluator(step_num, state.params))
                metrics["time/eval"] = time.perf_counter() - t_eval
            writer.write(step_num, metrics)
            progress.update(step_num, cfg.total_steps, metrics)
            stopping = stop.requested()
            last = step_num == cfg.total_steps
            if step_num % s.checkpoint.every_steps == 0 or last or stopping:
                save(step_num, data_iter.get_state())
            if stopping:
                raise Preempted(step_num, step_num, workdir)
    except _Abandon as a:
        # The step is dropped; its records (if any) are truncated away on resume.
        if a.step - 1 > saved:
            save(a.step - 1, a.iterator_state)
        raise Preempted(a.step, saved, workdir) from None
    finally:
        stop.close()
        progress.close()
        run.close()
        writer.close()
        ckpt.close()
    export_dir = None
    if s.export.at_end and cfg.total_steps > start:
        export_dir = _export(
            run.graphdef, state.params, run.tokenizer, workdir, s.export.dtype, is_chief
        )
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
