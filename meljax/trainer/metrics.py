"""Per-step metrics: ``WORKDIR/metrics.jsonl``, TensorBoard events, progress bar / log lines."""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import logging

METRICS_FILE = "metrics.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    return value


def read_metrics(workdir: str) -> list[dict]:
    """All metric records of a run, in order (malformed trailing lines are ignored)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


class MetricsWriter:
    """Writes one JSON line per step (only on the chief process), optional TensorBoard, and
    hands every record to ``loggers`` (objects with ``log(step, metrics)`` and ``close()``,
    e.g. :class:`meljax.trainer.wandb_log.WandbLogger`)."""

    def __init__(
        self, workdir: str, *, is_chief: bool = True, tensorboard: bool = True, loggers=()
    ):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.is_chief = is_chief
        self.loggers = list(loggers) if is_chief else []
        self._tb = None
        if is_chief and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except Exception as e:  # TensorBoard is optional; the JSONL file is the record
                logging.warning("TensorBoard disabled: %s", e)

    def truncate_after(self, step: int) -> None:
        """Drops records newer than ``step`` (written after the checkpoint a resume starts from),
        so a resumed run's file reads as if it had never stopped."""
        if not self.is_chief or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(os.path.dirname(self.path)) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.is_chief:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
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
