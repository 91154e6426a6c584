"""``meljax eval``: Pass@1 (greedy), Avg@k and Pass@k of a model on benchmark files.

Examples::

  meljax eval --model=demo --benchmarks=data/gsm8k/test.jsonl --limit=8 --num_samples=2
  meljax eval --workdir=runs/mel --benchmarks=math500=data/math500,aime24=data/aime24

``--benchmarks`` is a comma-separated list of ``PATH`` or ``PRESET=PATH`` entries; a file's
layout preset is inferred from its folder name (``.../math500/test.jsonl`` -> ``math500``).
The table is printed; the JSON report (``--output``, default ``eval_report.json`` in the workdir
or the current folder) and a JSONL of per-problem records beside it are written.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from absl import app, flags

from meljax.commands.common import clean_errors, maybe_initialize_distributed
from meljax.runtime import files

_MODEL = flags.DEFINE_string(
    "model", None, "Hugging Face model folder, a .gguf file, or 'demo' (SmolLM2-135M-Instruct)."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A training run's folder: evaluates its latest checkpoint (or --step)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: latest).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer folder (default: the model folder / the run's tokenizer)."
)
_BENCHMARKS = flags.DEFINE_list(
    "benchmarks", [], "Comma-separated PATH or PRESET=PATH entries (file or folder)."
)
_LIMIT = flags.DEFINE_integer("limit", 0, "Use the first N problems of each benchmark (0 = all).")
_ON_BAD_ROW = flags.DEFINE_enum(
    "on_bad_row", "error", ["error", "skip"], "What to do with a row lacking question/answer."
)
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", 8, "Samples per problem for Avg@k / Pass@k (k); 0 skips the sampled pass."
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.6, "Temperature of the sampled pass.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling of the sampled pass (1 = off).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k sampling of the sampled pass (0 = off).")
_PASS_K = flags.DEFINE_list(
    "pass_k", [], "k values of the reported Pass@k (each <= num_samples); default: num_samples."
)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 1024, "Completion length limit (tokens).")
_GREEDY = flags.DEFINE_boolean("greedy", True, "Run the greedy pass (Pass@1).")
_ANSWER_MODE = flags.DEFINE_enum(
    "answer_mode",
    "boxed",
    ["boxed", "last_number", "boxed_or_last_number"],
    "How the final answer is extracted from a completion.",
)
_PROMPT_TEMPLATE = flags.DEFINE_enum(
    "prompt_template", "chat", ["chat", "raw"], "chat (tokenizer's chat template) | raw."
)
_INSTRUCTION = flags.DEFINE_string(
    "instruction",
    "default",
    "'default' (step by step, \\boxed{}), 'demo' (answer with a number), 'none', or the text.",
)
_SYSTEM_PROMPT = flags.DEFINE_string("system_prompt", "", "Optional system message (chat).")
_BOS = flags.DEFINE_enum("bos", "auto", ["auto", "always", "never"], "BOS token policy.")
_STOP_STRINGS = flags.DEFINE_multi_string(
    "stop_string", [], "Completions end at this string (repeat for several), e.g. '\nQuestion:'."
)
_MAX_PROMPT_TOKENS = flags.DEFINE_integer(
    "max_prompt_tokens",
    0,
    "Cut longer prompts from the left (0: the model's context less max_new_tokens).",
)
_MAX_SLOTS = flags.DEFINE_integer(
    "max_slots",
    64,
    "Decode slots of the engine (one sample each); greedy and sampled requests share them.",
)
_KV_BUDGET = flags.DEFINE_float(
    "kv_budget_gib", 0.0, "Most KV-cache GiB per device for the slots (0 = no limit)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampled pass.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the model (--model)."
)
_CACHE_DTYPE = flags.DEFINE_string("cache_dtype", "", "KV-cache dtype ('' = compute dtype).")
_MESH = flags.DEFINE_string(
    "mesh", "", "'' = one device; 'auto' = all devices (fsdp); or sizes like 'data=2,fsdp=4'."
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "JSON report path (default: eval_report.json in the workdir or here)."
)
_KEEP_COMPLETIONS = flags.DEFINE_boolean(
    "keep_completions", False, "Also store every sampled completion's text in the records."
)
_VERIFIER_WORKERS = flags.DEFINE_integer(
    "verifier_workers", 2, "Answer-checking processes (0: in this process)."
)
_VERIFY_TIMEOUT = flags.DEFINE_float("verify_timeout_s", 5.0, "Time limit per answer check (s).")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show progress bars.")

_DEFAULT_REPORT = "eval_report.json"


def parse_mesh(value: str):
    """``''`` -> ``None``; ``'auto'`` -> every device on ``fsdp``; ``'data=2,fsdp=4'`` -> sizes."""
    if not value:
        return None
    from meljax.runtime import sharding as shd

    if value == "auto":
        return shd.make_mesh(None)
    sizes: dict[str, int] = {}
    for part in value.split(","):
        axis, sep, size = part.partition("=")
        if not sep or not size.strip().lstrip("-").isdigit():
            raise ValueError(
                f"--mesh={value!r}: expected AXIS=SIZE entries such as 'data=2,fsdp=4'"
            )
        sizes[axis.strip()] = int(size)
    return shd.make_mesh(sizes)


def check_model_arg(model: str) -> None:
    """Fails fast (before any heavy import) on a ``--model`` path that does not exist.

    Bare names such as ``demo`` are left to :func:`meljax.models.resolve_model_path`.
    """
    from meljax.models.sources import is_hub_id, is_remote

    if is_remote(model) or is_hub_id(model):
        return  # resolved (downloaded / copied) later, with its own error
    looks_like_path = os.sep in model or model.startswith(".") or model.endswith(".gguf")
    if looks_like_path and not os.path.exists(os.path.expanduser(model)):
        kind = "GGUF file" if model.endswith(".gguf") else "model folder"
        raise FileNotFoundError(
            f"--model: {kind} not found: {model} (expected a Hugging Face folder with "
            f"config.json, a .gguf file, a hub id org/name, gs://... or 'demo')"
        )


def load_model(model: str, *, dtype: str, tokenizer: str | None, mesh) -> tuple[Any, Any, str]:
    """``(model, tokenizer, resolved folder)`` from ``--model``.

    Raises:
      FileNotFoundError: a missing folder, ``.gguf`` file or ``config.json``.
    """
    from meljax.models import from_pretrained, load_tokenizer, resolve_model_path

    check_model_arg(model)
    path = resolve_model_path(model)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--model: model folder not found: {path} (expected a Hugging Face folder with "
            f"config.json, a .gguf file, or 'demo')"
        )
    loaded = from_pretrained(path, dtype=dtype, mesh=mesh)
    tok_path = resolve_model_path(tokenizer) if tokenizer else path
    return loaded, load_tokenizer(tok_path), path


def load_workdir(workdir: str, *, step: int | None, tokenizer: str | None, mesh):
    """``(model, tokenizer, run config)`` of a training run's checkpoint."""
    from meljax.runtime import files
    from meljax.trainer.checkpointing import has_checkpoint, load_policy_from_workdir

    if files.is_local(workdir):
        workdir = os.path.abspath(workdir)  # orbax refuses relative checkpoint paths
    if not files.path(workdir).exists():
        raise FileNotFoundError(f"--workdir: no such folder: {workdir}")
    if not has_checkpoint(workdir):
        raise FileNotFoundError(f"--workdir: no training run with a checkpoint in {workdir}")
    model, tok, run_cfg = load_policy_from_workdir(workdir, step, mesh=mesh)
    if tokenizer:
        from meljax.models import load_tokenizer, resolve_model_path

        tok = load_tokenizer(resolve_model_path(tokenizer))
    return model, tok, run_cfg


def run():
    """Runs the command from the parsed flags; returns the report and the written paths."""
    fl = flags.FLAGS
    if bool(_MODEL.value) == bool(_WORKDIR.value):
        raise ValueError("give exactly one of --model (a model folder / .gguf / demo) or --workdir")
    if _MODEL.value:
        check_model_arg(_MODEL.value)
    if not _BENCHMARKS.value:
        raise ValueError("--benchmarks is required (comma-separated PATH or PRESET=PATH)")
    if _LIMIT.value < 0:
        raise ValueError(f"--limit must be >= 0, got {_LIMIT.value}")
    pass_ks = []
    for k in _PASS_K.value:
        try:
            pass_ks.append(int(k))
        except ValueError:
            raise ValueError(f"--pass_k: {k!r} is not an integer") from None

    from meljax.evaluation import EvalConfig, evaluate, load_benchmarks, parse_benchmark_specs
    from meljax.rewards import RewardConfig, Verifier
    from meljax.sampling.policy import Policy, PromptConfig

    specs = parse_benchmark_specs(_BENCHMARKS.value)
    # Read the data first: a typo in a path should fail before a model is loaded.
    benchmarks, files_info = load_benchmarks(
        specs, limit=_LIMIT.value, on_bad_row=_ON_BAD_ROW.value
    )
    eval_config = EvalConfig(
        num_samples=_NUM_SAMPLES.value,
        temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value,
        top_k=_TOP_K.value,
        max_new_tokens=_MAX_NEW_TOKENS.value,
        greedy=_GREEDY.value,
        pass_ks=tuple(pass_ks),
        keep_sample_completions=_KEEP_COMPLETIONS.value,
    )

    # Same multi-host start-up as `meljax train` (TPU / SLURM detection); no-op on one host.
    from meljax.config.settings import base_config, settings

    maybe_initialize_distributed(base_config().distributed)
    mesh = parse_mesh(_MESH.value)
    # Prompt and verifier settings: a run's own (a policy trained on one prompt format is
    # judged on that format), else the defaults; a flag given on the command line wins.
    run_cfg = None
    meta: dict[str, Any] = {"benchmarks": files_info}
    if _MODEL.value:
        model, tokenizer, path = load_model(
            _MODEL.value, dtype=_DTYPE.value, tokenizer=_TOKENIZER.value, mesh=mesh
        )
        meta["model"] = path
        default_output = _DEFAULT_REPORT
        prompt = PromptConfig(max_prompt_tokens=0)
        reward = RewardConfig()
    else:
        model, tokenizer, run_cfg = load_workdir(
            _WORKDIR.value, step=_STEP.value, tokenizer=_TOKENIZER.value, mesh=mesh
        )
        meta.update(workdir=_WORKDIR.value, step=_STEP.value or "latest")
        default_output = str(files.path(_WORKDIR.value, _DEFAULT_REPORT))
        run = settings(run_cfg)
        prompt, reward = run.prompt, run.reward
    prompt_flags = {
        "prompt_template": _PROMPT_TEMPLATE,
        "instruction": _INSTRUCTION,
        "system_prompt": _SYSTEM_PROMPT,
        "bos": _BOS,
        "max_prompt_tokens": _MAX_PROMPT_TOKENS,
    }
    given = {k: f.value for k, f in prompt_flags.items() if fl[f.name].present or run_cfg is None}
    if fl["stop_string"].present or run_cfg is None:
        given["stop_strings"] = tuple(_STOP_STRINGS.value)
    prompt = dataclasses.replace(prompt, **given)
    reward_given = {"num_workers": _VERIFIER_WORKERS.value, "timeout_s": _VERIFY_TIMEOUT.value}
    if fl["answer_mode"].present or run_cfg is None:
        reward_given["mode"] = _ANSWER_MODE.value
    reward = dataclasses.replace(reward, **reward_given)

    from flax import nnx

    graphdef, params = nnx.split(model)
    policy = Policy.build(
        graphdef,
        tokenizer,
        prompt,
        mesh=mesh,
        cache_dtype=_CACHE_DTYPE.value or None,
        max_slots=_MAX_SLOTS.value,
        kv_budget_gib=_KV_BUDGET.value,
    )
    policy.set_params(params)
    with Verifier(reward) as verifier:
        report = evaluate(
            policy,
            verifier,
            benchmarks,
            eval_config,
            seed=_SEED.value,
            progress=_PROGRESS.value,
            meta=meta,
        )
    output = _OUTPUT.value or default_output
    stem = output[: -len(".json")] if output.endswith(".json") else output
    paths = (output, stem + ".records.jsonl")
    import jax

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
