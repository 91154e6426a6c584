"""The ``meljax`` command line: ``meljax <command> [--flags]``.

Each command lives in ``meljax.commands.<name>``, defines its own absl flags and a
``main(argv)``; only the chosen command's module is imported, so flags never clash.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": "MEL / GRPO training (no flags: the embedded CPU demo)",
    "eval": "Pass@1 / Avg@k / Pass@k on benchmark files",
    "sample": "sample completions from a model",
    "convert": "GGUF, HF folder or training checkpoint -> Hugging Face folder",
    "report": "plot a run's curves to a PNG and print a summary",
    "compare": "runs side by side: one figure and one table (e.g. GRPO vs MEL)",
    "plan": "compile a run for a TPU slice (or cpu:N): memory, FLOPs, collectives, fit",
}


def usage() -> str:
    lines = ["usage: meljax <command> [--flags]   (meljax <command> --help for its flags)", ""]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    # transformers' "PyTorch was not found" notice: meljax never needs torch, so it is no news.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        print(f"meljax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    from absl import app, flags

    if name == "train":  # update-bound on CPU; sampling measured slower with it (hostmem)
        from meljax import hostmem

        hostmem.keep_freed_memory()  # before JAX starts its threads
    module = importlib.import_module(f"meljax.commands.{name}")
    if any(a in ("-h", "--help", "-help") for a in argv[2:]):
        # absl's own --help lists only the __main__ module's flags; show the command's.
        print(f"meljax {name}: {COMMANDS[name]}\n{(module.__doc__ or '').strip()}\n")
        print(flags.FLAGS.module_help(module))
        sys.exit(0)
    from meljax.commands.config_files import resolve_argv

    rest = resolve_argv(argv[2:])  # --config=demo: a config shipped in the package
    if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in rest):
        rest = ["--verbosity=-1"] + rest  # warnings and errors only; results are printed
    app.run(module.main, argv=[f"meljax {name}"] + rest)


if __name__ == "__main__":
    run()
