"""``meljax eval``: Pass@1 (greedy), Avg@k and Pass@k of a model on benchmark files.

Examples::

  meljax eval                                    # the demo model on the demo's held-out sums
  meljax eval --config.model.path=demo --config.eval.benchmarks=data/gsm8k/test.jsonl \\
      --config.eval.limit=8 --config.eval.num_samples=2
  meljax eval --workdir=runs/mel --config.eval.benchmarks=math500=data/math500,aime24=data/aime24

The settings are a training config's, read the same way as ``meljax train`` reads them:
``--config`` (a config file or a shipped config's name; default: the demo) and
``--config.SECTION.FIELD=VALUE`` overrides. The sections that matter here: ``model`` (what is
evaluated), ``eval`` (benchmarks, limit, num_samples, temperature, top_p, top_k, pass_ks,
max_new_tokens, greedy, keep_sample_completions), ``data`` (how a question becomes a prompt:
prompt_template, instruction, system_prompt, bos, max_prompt_tokens, stop_strings; and
on_bad_row), ``reward`` (answer checking: mode, num_workers, timeout_s), ``rollout`` (the
engine: max_slots, kv_budget_gib, cache_dtype, ...), ``mesh``, ``seed`` (of the sampled pass)
and ``logging.progress_bar``.

With ``--workdir`` the run's own config (``WORKDIR/config.json``) is the base, so its policy is
judged on the prompt format and verifier it was trained with; ``--config.*`` overrides apply on
top (the model is the checkpoint's: of ``model`` only ``model.tokenizer`` may change).

``eval.benchmarks`` is a comma-separated list of ``PATH`` or ``PRESET=PATH`` entries; a file's
layout preset is inferred from its folder name (``.../math500/test.jsonl`` -> ``math500``).
The table is printed; the JSON report (``--output``, default ``eval_report.json`` in the workdir
or the current folder) and a JSONL of per-problem records beside it are written.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from meljax.commands.common import clean_errors, maybe_initialize_distributed
from meljax.commands.config_files import shipped
from meljax.runtime import files

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    shipped("demo"),
    "Config file (configs/*.py or a shipped name): the model, benchmarks, prompts, verifier, "
    "engine and mesh. With --workdir only --config.KEY=VALUE overrides (of the run's config).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "A training run's folder: evaluates its latest checkpoint (or --step); the run's config "
    "is the base of the --config.* overrides.",
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: latest).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "JSON report path (default: eval_report.json in the workdir or here)."
)

_DEFAULT_REPORT = "eval_report.json"


def config_and_provenance() -> tuple[Any, dict[str, Any]]:
    """The config of this evaluation (``--config``, or the run's for ``--workdir``, with the
    ``--config.*`` overrides applied) and where it came from, for the report."""
    config_flag = flags.FLAGS["config"]
    overrides = dict(config_flags.get_override_values(config_flag))
    if _WORKDIR.value is None:
        if _STEP.value is not None:
            raise ValueError("--step needs --workdir (a training run's folder)")
        source = config_flags.get_config_filename(config_flag)
        return _CONFIG.value, {"config": source, "config_overrides": overrides}
    if config_flag.present:
        raise ValueError(
            "--workdir evaluates the run with its own config (WORKDIR/config.json): give "
            "--config.KEY=VALUE overrides, not --config"
        )
    fixed = sorted(k for k in overrides if k.startswith("model.") and k != "model.tokenizer")
    if fixed:
        raise ValueError(
            f"--config.{fixed[0]}: with --workdir the model is the run's checkpoint; of the "
            f"model section only model.tokenizer can be overridden"
        )
    from meljax.trainer.checkpointing import has_checkpoint
    from meljax.trainer.loop import load_config_from_workdir
    from meljax.trainer.workdir import CONFIG_FILE

    workdir = _WORKDIR.value
    if files.is_local(workdir):
        workdir = os.path.abspath(workdir)  # orbax refuses relative checkpoint paths
    if not files.path(workdir).exists():
        raise FileNotFoundError(f"--workdir: no such folder: {workdir}")
    if not has_checkpoint(workdir):
        raise FileNotFoundError(f"--workdir: no training run with a checkpoint in {workdir}")
    cfg = load_config_from_workdir(workdir)
    cfg.update_from_flattened_dict(overrides)
    source = str(files.path(workdir, CONFIG_FILE))
    return cfg, {"config": source, "config_overrides": overrides, "workdir": workdir}


def load_model(s, mesh, workdir: str | None) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, provenance)``: the config's model, or ``workdir``'s checkpoint
    (``--step``, default the latest).

    Raises:
      FileNotFoundError: a missing model folder, ``.gguf`` file, hub id or checkpoint.
    """
    from meljax.models import load_tokenizer, resolve_model_path
    from meljax.trainer import setup

    m = s.model
    if workdir is None:
        # resolved first: a missing model is one line naming it, before anything loads
        where = "random (model.random)" if m.random_init else resolve_model_path(m.path)
        model, tokenizer = setup.build_model_and_tokenizer(m, s.random, s.run.seed, mesh=mesh)
        return model, tokenizer, {"model": where}
    from meljax.trainer.checkpointing import load_policy_from_workdir

    model, tokenizer, run_cfg = load_policy_from_workdir(workdir, _STEP.value, mesh=mesh)
    if m.tokenizer and m.tokenizer != run_cfg.model.tokenizer:  # --config.model.tokenizer
        tokenizer = load_tokenizer(resolve_model_path(m.tokenizer))
    return model, tokenizer, {"step": _STEP.value or "latest"}


def run():
    """Runs the command from the parsed flags; returns the report and the written paths."""
    cfg, meta = config_and_provenance()
    # Same multi-host start-up as `meljax train` (TPU / SLURM detection); no-op on one host.
    maybe_initialize_distributed(cfg.distributed)
    import jax

    from meljax.config.settings import validate

    # the typed settings, once: a bad value (or a mesh that does not fit) is one line
    s = validate(cfg, jax.device_count())
    if not s.eval.benchmarks:
        raise ValueError(
            "eval.benchmarks is empty: give --config.eval.benchmarks=PATH or PRESET=PATH "
            "entries (comma-separated)"
        )

    from meljax.evaluation import evaluate, load_benchmarks, parse_benchmark_specs

    specs = parse_benchmark_specs(s.eval.benchmarks)
    # Read the data first: a typo in a path should fail before a model is loaded.
    benchmarks, meta["benchmarks"] = load_benchmarks(
        specs, limit=s.eval.limit, on_bad_row=s.data.on_bad_row
    )
    from flax import nnx

    from meljax.trainer import setup

    mesh = setup.build_mesh(s.mesh)
    workdir = meta.get("workdir")
    model, tokenizer, where = load_model(s, mesh, workdir)
    meta.update(where)
    graphdef, params = nnx.split(model)
    # the run's policy and verifier: prompts, stops, engine and verdicts as in training
    policy = setup.build_policy(s, graphdef, tokenizer, mesh)
    bar = s.logging.progress_bar
    progress = bar == "on" or (bar == "auto" and sys.stderr.isatty())
    with setup.build_verifier(s) as verifier:
        report = evaluate(
            policy,
            policy.prepare(params),
            verifier,
            benchmarks,
            s.eval,
            seed=s.run.seed,
            progress=progress,
            meta=meta,
        )
    default_output = str(files.path(workdir, _DEFAULT_REPORT)) if workdir else _DEFAULT_REPORT
    output = _OUTPUT.value or default_output
    stem = output[: -len(".json")] if output.endswith(".json") else output
    paths = (output, stem + ".records.jsonl")
    if jax.process_index() == 0:  # every host computed the same report; one writes it
        paths = report.write(output)
    return report, paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with clean_errors("eval"):
        report, (report_path, records_path) = run()
    print(report.table())
    engine = report.timing.get("engine", {})
    print(
        f"engine: {engine.get('seconds', 0.0):.1f} s, {engine.get('tokens_per_s', 0.0):.1f} "
        f"tokens/s, slot utilisation {engine.get('slot_utilisation', 0.0):.2f}",
        file=sys.stderr,
    )
    print(f"wrote {report_path} and {records_path}")


if __name__ == "__main__":
    app.run(main)
