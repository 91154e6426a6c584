"""``meljax train --config=configs/X.py --workdir=DIR [--config.a.b=v ...]``.

With no flags it runs the embedded CPU demo (``configs/demo.py``, shipped in the package) into
``workdirs/demo`` under the current folder. ``--config`` takes a path or a shipped config's name
(``--config=tiny``, ``--config=qwen3_8b_mel``).
Rerunning the same command resumes from the latest checkpoint; a larger
``--config.total_steps`` continues a finished run. On SIGTERM (a preempted VM) the run stops at
its next phase boundary, saves a checkpoint and exits with code 143; rerun to resume.

One run per workdir: a second ``meljax train`` on a workdir in use stops with exit code 2,
naming the first (host, pid, since when). A resume with a config that shapes the run
differently (``--config.rollout.group_size=8`` after 4) is refused with exit code 2, listing
the differing keys, unless ``--allow_config_change``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from meljax.commands.common import clean_errors, maybe_initialize_distributed
from meljax.commands.config_files import shipped

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped on request, checkpoint saved, resumable

_CONFIG = config_flags.DEFINE_config_file(
    "config", shipped("demo"), "Config file (configs/*.py or a shipped name).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder (local or gs://); default: workdirs/<config name>."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_boolean(
    "allow_config_change",
    False,
    "Resume a run with a config that differs in what shapes the run (model, data, rollout, "
    "algorithm, optim, mesh, seed, ...); without it such a resume is refused. Changes to "
    "total_steps, logging, eval, checkpoint cadence and export are always allowed. Either way "
    "the changes are recorded in WORKDIR/config_history.jsonl.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax / absl INFO lines would drown progress
    with clean_errors("train"):
        cfg = _CONFIG.value
        maybe_initialize_distributed(cfg.distributed)
        import jax

        from meljax.config.settings import validate
        from meljax.trainer.loop import Preempted, train

        validate(cfg, jax.device_count())
        workdir = _WORKDIR.value
        if workdir is None:
            name = os.path.splitext(
                os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
            )[0]
            workdir = os.path.join("workdirs", name)
        try:
            summary = train(cfg, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
        except Preempted as e:
            print(f"meljax train: {e}", file=sys.stderr, flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)
    if jax.process_index() == 0:
        print(summary.describe())


if __name__ == "__main__":
    app.run(main)
