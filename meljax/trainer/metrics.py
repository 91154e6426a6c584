"""Per-step metrics: ``WORKDIR/metrics.jsonl``, TensorBoard events, progress bar / log lines."""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time

from absl import logging

from meljax.runtime import files

METRICS_FILE = "metrics.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    return value


def read_metrics(workdir: str) -> list[dict]:
    """All metric records of a run, in order (unreadable lines are skipped with a warning)."""
    return files.read_jsonl(files.path(workdir, METRICS_FILE))


class MetricsWriter:
    """Writes one JSON line per step (only on the chief process), optional TensorBoard, and
    hands every record to ``loggers`` (objects with ``log(step, metrics)`` and ``close()``,
    e.g. :class:`meljax.trainer.wandb_log.WandbLogger`).

    Everything goes to the workdir through :mod:`meljax.runtime.files` (gs:// included). TensorBoard
    writes local event files; for a remote workdir they are written to a local staging folder
    and copied to ``WORKDIR/tensorboard`` after every step.
    """

    def __init__(
        self, workdir: str, *, is_chief: bool = True, tensorboard: bool = True, loggers=()
    ):
        self.path = files.path(workdir, METRICS_FILE)
        self.is_chief = is_chief
        self.loggers = list(loggers) if is_chief else []
        self._tb = None
        self._tb_remote = None
        if is_chief and tensorboard:
            target = files.path(workdir, "tensorboard")
            local = str(target)
            if not files.is_local(workdir):
                local = tempfile.mkdtemp(prefix="meljax-tb-")
                self._tb_remote = (local, target)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(local)
            except Exception as e:  # TensorBoard is optional; the JSONL file is the record
                logging.warning("TensorBoard disabled: %s", e)

    def truncate_after(self, step: int) -> None:
        """Drops records newer than ``step`` (written after the checkpoint a resume starts from),
        so a resumed run's file reads as if it had never stopped; unreadable lines are kept
        (see :func:`meljax.runtime.files.truncate_jsonl`)."""
        if self.is_chief:
            files.truncate_jsonl(self.path, lambda r: r.get("step", 0) <= step)

    def write(self, step: int, metrics: dict) -> None:
        if not self.is_chief:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        files.append_jsonl(self.path, [record])
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
            if self._tb_remote is not None:
                files.copy_tree(*self._tb_remote)
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            if self._tb_remote is not None:
                files.copy_tree(*self._tb_remote)
                shutil.rmtree(self._tb_remote[0], ignore_errors=True)
        for logger in self.loggers:
            logger.close()


class Progress:
    """A tqdm bar over steps on a terminal; plain log lines otherwise."""

    def __init__(self, start: int, total: int, mode: str = "auto", log_every: int = 1):
        use_bar = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.log_every = log_every
        self.t0 = time.time()
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="MEL", unit="step", dynamic_ncols=True)

    def update(self, step: int, total: int, m: dict) -> None:
        fields = {
            "reward": m.get("reward_mean"),
            "retain": m.get("retention_ratio"),
            "kept": m.get("mel/kept"),
            "s/step": m.get("time/step"),
        }
        shown = {
            k: (f"{v:.3g}" if isinstance(v, float) else v)
            for k, v in fields.items()
            if v is not None
        }
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif step % self.log_every == 0 or step == total:
            text = " ".join(f"{k}={v}" for k, v in shown.items())
            logging.info("step %d/%d %s", step, total, text)
            print(f"step {step}/{total} {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
