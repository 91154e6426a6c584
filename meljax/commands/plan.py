"""``meljax plan --config=configs/X.py --topology=v5p-64 [--json] [--config.a.b=v ...]``.

Compiles every program a ``meljax train`` run with this config would launch (rollout
sampling, MEL analysis and replay sampling, reference / old log-probs, the update with its
policy and NLL batches, periodic evaluation) for a TPU slice, on this host, without weights
or a TPU, and prints per-device memory, headroom, FLOPs, HBM bytes, collectives and a
roofline time estimate for each. Exits with 1 and a message naming the program and what to
change when one does not fit, 2 on bad input.

Topologies: v5p-N / v4-N count TensorCores (v5p-64 = 32 chips), v5e-N / v6e-N count chips,
libtpu names (v5p:2x4x4) work too; cpu:N compiles for N simulated CPU devices. TPU targets
need libtpu (pip install "meljax[tpu]"). The model comes from config.json in
--config.model.path (weights are not read), from --model_config=FILE, or from a built-in
table of the paper's architectures (Qwen3-1.7B/4B/8B/14B, SmolLM2-135M) matched by the
folder name.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from meljax.commands.common import clean_errors
from meljax.commands.config_files import shipped

_CONFIG = config_flags.DEFINE_config_file(
    "config", shipped("demo"), "Config file (configs/*.py or a shipped name).", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "v5p-64, v6e-32, v5e-16, v5p:2x4x4, cpu:8 ...", required=True
)
_JSON = flags.DEFINE_bool("json", False, "Print the report as JSON (for scripts).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the JSON report to this file.")
_PROGRAMS = flags.DEFINE_list(
    "programs", [], "Only these programs (rollout, analysis, replay, logprobs, update, ...)."
)
_MODEL_CONFIG = flags.DEFINE_string(
    "model_config", None, "A Hugging Face config.json (file or folder) for the architecture."
)
_DUMP_HLO = flags.DEFINE_string(
    "dump_hlo", None, "Write each compiled program's HLO text to this folder."
)
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib", None, "Plan against this much memory per device (GiB) instead of the chip's."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from meljax.plan.targets import prepare_process

    prepare_process(_TOPOLOGY.value)  # before JAX starts: host compile, simulated devices
    with clean_errors("plan"):
        from meljax.plan import plan

        def progress(line: str) -> None:
            if not _JSON.value:
                print(line, file=sys.stderr, flush=True)

        try:
            report = plan(
                _CONFIG.value,
                _TOPOLOGY.value,
                programs=_PROGRAMS.value or None,
                model_config=_MODEL_CONFIG.value,
                capacity_gib=_HBM_GIB.value,
                progress=progress,
                dump_dir=_DUMP_HLO.value,
            )
        except RuntimeError as e:  # libtpu missing: say how to install it
            if "libtpu" not in str(e):
                raise
            print(f"meljax plan: error: {e}", file=sys.stderr)
            sys.exit(2)
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    if _JSON.value:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.table())
    if not report.fits:
        for line in report.problems():
            if not line.startswith("warning"):
                print(f"meljax plan: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
