"""``meljax convert --source=... --output=DIR``: GGUF file, HF folder or training workdir ->
a Hugging Face folder that ``transformers`` loads."""

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


def convert(source: str, output: str, *, step: int | None = None, dtype: str | None = None) -> str:
    from meljax.models import (
        convert_gguf,
        demo_gguf_path,
        from_pretrained,
        load_tokenizer,
        save_pretrained,
    )
    from meljax.trainer.checkpointing import has_checkpoint, load_policy_from_workdir

    if source == "demo":
        source = demo_gguf_path()
    if source.endswith(".gguf"):
        convert_gguf(source, output)
        if dtype is None:
            return output
        source = output
    if has_checkpoint(source):
        model, tokenizer, _ = load_policy_from_workdir(source, step)
    elif os.path.exists(os.path.join(source, "config.json")):
        model, tokenizer = from_pretrained(source), load_tokenizer(source)
    else:
        raise FileNotFoundError(
            f"--source={source!r} is neither a .gguf file, a Hugging Face folder "
            f"(config.json) nor a training workdir (config.json and checkpoints)"
        )
    return save_pretrained(model, output, tokenizer=tokenizer, dtype=dtype)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with clean_errors("convert"):
        if not _SOURCE.value or not _OUTPUT.value:
            raise ValueError("--source and --output are required")
        out = convert(_SOURCE.value, _OUTPUT.value, step=_STEP.value, dtype=_DTYPE.value)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
