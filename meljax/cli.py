"""The ``meljax`` command line: ``meljax <command> [--flags]``.

Each command lives in ``meljax.commands.<name>``, defines its own absl flags and a
``main(argv)``; only the chosen command's module is imported, so flags never clash.

Bad flags end in one line on stderr and exit code 2, before the command runs: an unknown
``--config.KEY`` (with a "did you mean" hint), a missing ``--config`` file, a value of the
wrong type, an unknown flag. ml_collections reads ``--config.*`` overrides while the
command's module is imported and absl parses the rest, so both are checked here.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys

COMMANDS = {
    "train": "MEL / GRPO training (no flags: the embedded CPU demo)",
    "eval": "Pass@1 / Avg@k / Pass@k on benchmark files",
    "sample": "sample completions from a model",
    "convert": "GGUF, HF folder or training checkpoint -> Hugging Face folder",
    "report": "plot a run's curves to a PNG and print a summary",
    "lessons": "a run's meta-experiences by step: kept, dropped and why, yield, MEL cost",
    "compare": "runs side by side: one figure and one table (e.g. GRPO vs MEL)",
    "plan": "compile a run for a TPU slice (or cpu:N): memory, FLOPs, collectives, fit",
}

USAGE_EXIT_CODE = 2  # bad flags, config keys or files: the README's "one message and exit 2"

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_BAD_VALUE = re.compile(r"^flag --config\.([^=]+)=(.*?): ", re.DOTALL)


def usage() -> str:
    lines = ["usage: meljax <command> [--flags]   (meljax <command> --help for its flags)", ""]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _fail(command: str, message: str) -> None:
    """One line (the message's first) on stderr, exit code 2."""
    print(f"meljax {command}: error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def config_keys() -> dict[str, type]:
    """Every config key of the schema (sections included) -> the type of its default; a
    config file only sets these keys (``meljax.config.settings`` refuses any other)."""
    from meljax.config.settings import base_config

    out: dict[str, type] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            out[path] = type(value)
            if hasattr(value, "items"):
                walk(value, path + ".")

    walk(base_config(), "")
    return out


def did_you_mean(key: str, known: list[str]) -> str:
    """`` (did you mean rollout.group_size?)`` for the closest known key, else ``""``."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a right field in the wrong section: compare the last names
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(known)}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1)]
    return f" (did you mean {close[0]}?)" if close else ""


def _config_file(args: list[str]) -> str | None:
    """The ``--config`` value in ``args`` (``--config=F`` or ``--config F``), else ``None``."""
    for i, arg in enumerate(args):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(args):
            return args[i + 1]
    return None


def config_arg_error(args: list[str]) -> str | None:
    """What is wrong with the ``--config`` file and ``--config.KEY`` overrides of ``args``
    (a missing file, an unknown key), or ``None``: checked before absl and ml_collections
    parse them, whose own errors are tracebacks."""
    path = _config_file(args)
    if path is not None and not os.path.isfile(path) and not os.path.isfile(path.split(":")[0]):
        return f"--config: config file not found: {path}"
    overrides = [m.group(1) for m in map(_OVERRIDE.match, args) if m]
    if not overrides:
        return None
    known = config_keys()
    for key in overrides:
        if key.split("[", 1)[0] not in known:
            return f"unknown config key {key}{did_you_mean(key, list(known))}"
    return None


def flag_error_line(message: str) -> str:
    """absl's message of a bad flag value as one line; a ``--config.KEY`` value of the wrong
    type names the key and the type it expects."""
    m = _BAD_VALUE.match(message)
    if m:
        key, value = m.group(1), m.group(2)
        expected = config_keys().get(key)
        if expected is not None:
            return f"config key {key} expects {expected.__name__}, got {value!r}"
    return " ".join(message.split())


def _flags_parser(command: str):
    """absl's flag parsing, with bad flags ending in one line and exit code 2."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        problem = config_arg_error(argv[1:]) if "config" in flags.FLAGS else None
        if problem:
            _fail(command, problem)
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            _fail(command, flag_error_line(str(e)))
        raise AssertionError("unreachable")

    return parse


def _import_command(name: str, args: list[str]):
    """The command's module. Importing it defines its flags, and ml_collections then already
    applies ``--config.*`` overrides to the default config: a bad one fails here."""
    try:
        return importlib.import_module(f"meljax.commands.{name}")
    except (AttributeError, KeyError, OSError, ValueError, TypeError):
        problem = config_arg_error(args)
        if problem is None or os.environ.get("MELJAX_TRACEBACK"):
            raise
        _fail(name, problem)


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

    from meljax.commands.config_files import resolve_argv

    argv[2:] = resolve_argv(argv[2:])  # --config=demo: a config shipped in the package
    if name == "train":  # update-bound on CPU; sampling runs slower with it (hostmem)
        from meljax.runtime import hostmem

        hostmem.keep_freed_memory()  # before JAX starts its threads
    # Commands that run JAX programs here keep them on disk (plan compiles for other
    # topologies; report, lessons and compare run none and need not import JAX).
    if name in ("train", "eval", "sample", "convert"):
        from meljax.commands import compile_cache

        compile_cache.enable()
    module = _import_command(name, argv[2:])
    if any(a in ("-h", "--help", "-help") for a in argv[2:]):
        # absl's own --help lists only the __main__ module's flags; show the command's.
        print(f"meljax {name}: {COMMANDS[name]}\n{(module.__doc__ or '').strip()}\n")
        print(flags.FLAGS.module_help(module))
        sys.exit(0)
    rest = argv[2:]
    if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in rest):
        rest = ["--verbosity=-1"] + rest  # warnings and errors only; results are printed
    app.run(module.main, argv=[f"meljax {name}"] + rest, flags_parser=_flags_parser(name))


if __name__ == "__main__":
    run()
