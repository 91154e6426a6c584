"""Weights & Biases logging of the per-step metrics (``logging.wandb=True``; optional package).

Only process 0 logs. The run's files go under ``WORKDIR/wandb`` (``WORKDIR/wandb/offline-run-*``
in offline mode, for ``wandb sync`` later). The W&B run id is kept in ``WORKDIR/wandb_run_id``,
so a resumed training run continues the same W&B run; W&B ignores steps at or below the last
one it received (those a killed run logged after its last checkpoint).

Install with ``pip install "meljax[wandb]"``.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from collections.abc import Mapping
from typing import Any

import ml_collections

from meljax.runtime import files

RUN_ID_FILE = "wandb_run_id"
MODES = ("", "online", "offline", "disabled")


class WandbLogger:
    """``log(step, metrics)`` / ``close()`` over one W&B run (see the module docstring).

    Args:
      cfg: the run's config; ``cfg.logging.wandb_*`` name the project, entity, run name and
        mode, and the whole config is stored as the W&B run config.
      workdir: the training run folder (local).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
        try:
            import wandb
        except ImportError as e:
            raise ValueError(
                'logging.wandb=True needs the wandb package: pip install "meljax[wandb]"'
            ) from e
        lg = cfg.logging
        if lg.wandb_mode not in MODES:
            raise ValueError(f"logging.wandb_mode={lg.wandb_mode!r} is not one of {MODES}")
        # The run id lives in the workdir (gs:// included) so a resumed run continues the same
        # W&B run; W&B's own files need a local folder (a staging one for remote workdirs).
        id_path = files.path(workdir, RUN_ID_FILE)
        if id_path.exists():
            run_id = id_path.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
            files.write_text(id_path, run_id + "\n")
        local = os.path.abspath(workdir) if files.is_local(workdir) else tempfile.mkdtemp()
        os.makedirs(local, exist_ok=True)
        name = lg.wandb_name or files.path(workdir).name
        self.run = wandb.init(
            project=lg.wandb_project or None,
            entity=lg.wandb_entity or None,
            name=name,
            mode=lg.wandb_mode or None,  # None: W&B's own default (WANDB_MODE, else online)
            dir=local,
            id=run_id,
            resume="allow",
            config=cfg.to_dict(),
            # stdout stays the terminal's (progress bar); the metrics are the record
            settings=wandb.Settings(console="off"),
        )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs the finite numbers of ``metrics`` at ``step``."""
        values = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        self.run.log(values, step=int(step))

    def close(self) -> None:
        self.run.finish()


def build_loggers(
    cfg: ml_collections.ConfigDict, workdir: str, *, is_chief: bool
) -> list[WandbLogger]:
    """The extra metric loggers of a run: a :class:`WandbLogger` on process 0 when
    ``logging.wandb`` is on, else none."""
    if not (cfg.logging.wandb and is_chief):
        return []
    return [WandbLogger(cfg, workdir)]
