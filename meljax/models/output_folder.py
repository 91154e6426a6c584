"""Safe model output folders: stage in a temp folder, then replace only what meljax wrote.

``meljax convert`` and ``save_pretrained`` write a Hugging Face folder that may already hold
files of the user's (notes, the source ``.gguf``, another model). So every write goes to a
fresh staging folder beside the destination and is then published: a new folder is renamed
into place; an existing one needs ``overwrite`` and then only the files listed in its
``.meljax-manifest.json`` (the files meljax wrote there) are replaced or removed. Files meljax
did not write are never deleted: if one would be replaced, or is a weight file that would be
loaded together with (or instead of) the new weights, publishing is refused, naming it.

Staging folders are named ``.convert-<pid>-<host>-<random>``; one whose process is gone (or
that is older than :data:`STALE_AFTER_S`) is removed by the next write beside it, so a killed
conversion does not leave hundreds of hidden megabytes behind for good.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator

MANIFEST = ".meljax-manifest.json"
STAGING_PREFIX = ".convert-"
STALE_AFTER_S = 6 * 3600  # staging of another host (or of an older meljax): surely abandoned
_STAGING = re.compile(r"^\.convert-(\d+)-([0-9a-f]{8})-[a-z0-9_]+$")
_LEGACY_STAGING = re.compile(r"^\.convert-[a-z0-9_]{8}$")  # tempfile.mkdtemp of older meljax


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(folder: str, name: str, now: float) -> bool:
    """Whether ``name`` (inside ``folder``) is an abandoned meljax staging folder."""
    m = _STAGING.match(name)
    if m is None and not _LEGACY_STAGING.match(name):
        return False  # not one of ours
    if m is not None and m.group(2) == _host_tag():
        return not _pid_alive(int(m.group(1)))
    try:
        return now - os.stat(os.path.join(folder, name)).st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def remove_stale_staging(folder: str) -> list[str]:
    """Removes abandoned staging folders in ``folder``; returns their names.

    Why: a killed conversion cannot clean up after itself, so the next one does.
    """
    if not os.path.isdir(folder):
        return []
    now = time.time()
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path) and _is_stale(folder, name, now):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def new_staging(out_dir: str) -> str:
    """A fresh, empty staging folder beside ``out_dir`` (same file system, so renames are
    atomic), named with this process's pid; stale ones found there are removed first."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(parent)
    prefix = f"{STAGING_PREFIX}{os.getpid()}-{_host_tag()}-"
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


@contextlib.contextmanager
def scratch(out_dir: str) -> Iterator[str]:
    """A staging folder beside ``out_dir`` that is always removed on exit."""
    tmp = new_staging(out_dir)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(out_dir: str) -> set[str]:
    """Names that meljax's manifest in ``out_dir`` lists (plain names only; empty if none)."""
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            names = json.load(f).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and _plain_name(n)}


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..", MANIFEST) and os.path.basename(name) == name


def _write_manifest(folder: str, names: Iterable[str]) -> None:
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"written_by": "meljax", "files": sorted(names)}, f, indent=1)
    os.replace(tmp, os.path.join(folder, MANIFEST))


def is_weight_file(name: str) -> bool:
    """Safetensors weights or their index: mixing these with new ones changes the model."""
    return name.endswith((".safetensors", ".safetensors.index.json"))


def _listing(names: Iterable[str], limit: int = 6) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def plan_replacement(
    out_dir: str, new: Iterable[str], *, overwrite: bool, adopt: bool = False
) -> tuple[set[str], set[str]]:
    """(files of ``out_dir`` meljax owns, the owned ones to remove) for writing ``new`` there.

    Raises ValueError, naming the files, when ``out_dir`` is not empty and ``overwrite`` is
    false, or when it holds files meljax did not write that ``new`` would replace or that are
    weights (``adopt``: such files count as meljax's, for folders meljax made before it kept
    manifests, such as a run's ``workdir/export``).
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output {out_dir} exists and is not a folder")
    existing = set(os.listdir(out_dir)) - {MANIFEST} if os.path.isdir(out_dir) else set()
    if not existing:
        return set(), set()
    if not overwrite:
        raise ValueError(
            f"output folder {out_dir} is not empty ({_listing(existing)}); pass --overwrite to "
            f"replace the files meljax wrote there (no other file is deleted)"
        )
    owned = read_manifest(out_dir) & existing
    new = set(new)
    conflicts = {n for n in existing - owned if n in new or is_weight_file(n)}
    if conflicts and not adopt:
        raise ValueError(
            f"output folder {out_dir} holds {_listing(conflicts)}, not written by meljax (not "
            f"in its {MANIFEST}); move them away or choose another output folder"
        )
    owned |= conflicts
    return owned, owned - new


def check_destination(out_dir: str, *, overwrite: bool, adopt: bool = False) -> None:
    """Fails early (before any expensive work) when publishing to ``out_dir`` will fail."""
    plan_replacement(out_dir, {"config.json"}, overwrite=overwrite, adopt=adopt)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def publish(staging: str, out_dir: str, *, overwrite: bool, adopt: bool = False) -> None:
    """Moves the contents of ``staging`` into ``out_dir`` (see :func:`plan_replacement`).

    A new ``out_dir`` is ``staging`` renamed in one step. Otherwise the
    manifest first lists old and new files (so that an interruption orphans nothing), stale
    owned files go, new ones move in (``config.json`` last: it marks a complete folder), and
    the manifest is rewritten to list exactly the new files.
    """
    new = [n for n in sorted(os.listdir(staging)) if n != MANIFEST]
    owned, stale = plan_replacement(out_dir, new, overwrite=overwrite, adopt=adopt)
    if not os.path.lexists(out_dir):
        _write_manifest(staging, new)
        os.replace(staging, out_dir)
        return
    _write_manifest(out_dir, owned | set(new))
    for name in sorted(stale):
        _remove(os.path.join(out_dir, name))
    for name in sorted(new, key=lambda n: n == "config.json"):
        target = os.path.join(out_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)  # an owned folder (os.replace cannot replace a full one)
        os.replace(os.path.join(staging, name), target)
    _write_manifest(out_dir, new)
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged(out_dir: str, *, overwrite: bool, adopt: bool = False) -> Iterator[str]:
    """Yields a staging folder to write a model into; on success it is published to
    ``out_dir``, on any error (or interruption) it is removed and ``out_dir`` is untouched.

    The destination is checked first, so a refusal costs nothing.
    """
    check_destination(out_dir, overwrite=overwrite, adopt=adopt)
    tmp = new_staging(out_dir)
    try:
        yield tmp
        publish(tmp, out_dir, overwrite=overwrite, adopt=adopt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
