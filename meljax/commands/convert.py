"""``meljax convert --source=... --output=DIR``: GGUF file, HF folder or training workdir ->
a Hugging Face folder that ``transformers`` loads.

A non-empty ``--output`` is refused unless ``--overwrite``; even then only the files meljax
wrote there (its ``.meljax-manifest.json``) are replaced, never the user's or the source."""

from __future__ import annotations

import os

from absl import app, flags

from meljax.commands.common import clean_errors

_SOURCE = flags.DEFINE_string(
    "source", None, "A .gguf file, 'demo', a Hugging Face folder, or a training workdir."
)
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (Hugging Face layout).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: latest).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Stored weight dtype.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Allow a non-empty --output: the files meljax wrote there (listed in its "
    ".meljax-manifest.json) are replaced; no other file is deleted.",
)


def convert(
    source: str,
    output: str,
    *,
    step: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> str:
    """Converts ``source`` into the Hugging Face folder ``output``; returns ``output``.

    ``output`` must be empty or absent unless ``overwrite``; files meljax did not write there
    (and the source) are never deleted (see :mod:`meljax.models.output_folder`).
    """
    from meljax.models import convert_gguf, demo_gguf_path, output_folder

    if source == "demo":
        source = demo_gguf_path()
    if os.path.isdir(source) and os.path.realpath(source) == os.path.realpath(output):
        raise ValueError(f"--output={output} is the --source folder; choose another folder")
    output_folder.check_destination(output, overwrite=overwrite)
    if not source.endswith(".gguf"):
        return _save(source, output, step, dtype, overwrite)
    if dtype is None:
        return convert_gguf(source, output, overwrite=overwrite)
    with output_folder.scratch(output) as tmp:  # float32 first, then the wanted dtype
        hf = convert_gguf(source, os.path.join(tmp, "hf"))
        return _save(hf, output, None, dtype, overwrite)


def _save(source: str, output: str, step: int | None, dtype: str | None, overwrite: bool) -> str:
    """A Hugging Face folder or a training workdir, loaded and saved as ``output``."""
    from meljax.models import from_pretrained, load_tokenizer, save_pretrained
    from meljax.trainer.checkpointing import has_checkpoint, load_policy_from_workdir

    if has_checkpoint(source):
        model, tokenizer, _ = load_policy_from_workdir(source, step)
    elif os.path.exists(os.path.join(source, "config.json")):
        model, tokenizer = from_pretrained(source), load_tokenizer(source)
    else:
        raise FileNotFoundError(
            f"--source={source!r} is neither a .gguf file, a Hugging Face folder "
            f"(config.json) nor a training workdir (config.json and checkpoints)"
        )
    return save_pretrained(model, output, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with clean_errors("convert"):
        if not _SOURCE.value or not _OUTPUT.value:
            raise ValueError("--source and --output are required")
        out = convert(
            _SOURCE.value,
            _OUTPUT.value,
            step=_STEP.value,
            dtype=_DTYPE.value,
            overwrite=_OVERWRITE.value,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
