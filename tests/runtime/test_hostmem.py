"""Host-memory allocator settings: a freed big block is reused without new page faults."""

import subprocess
import sys

import pytest

from meljax.runtime import hostmem

# Allocates, touches and frees a 256 MiB block twice through libc (as XLA:CPU does for a
# program's temporaries), from a worker thread (XLA runs programs on its own threads, whose
# malloc arenas mmap every big block); prints the minor page faults of the second round.
_PROBE = """
import ctypes, ctypes.util, resource, sys, threading
from meljax.runtime import hostmem
print(hostmem.keep_freed_memory())
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size, faults = 256 << 20, []

def work():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        libc.memset(p, 1, size)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

t = threading.Thread(target=work)
t.start()
t.join()
print(faults[1])
"""


def _probe(setting: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={"MELJAX_HOST_MALLOC": setting, "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_memory_is_reused_without_page_faults():
    state, faults = _probe("keep")
    if state == "not glibc":
        pytest.skip("this C library has no mallopt")
    assert state == "kept"
    pages = (256 << 20) // 4096
    assert faults < pages // 10  # the freed block came back as it was
    state, faults = _probe("default")
    assert state == "off"
    assert faults > pages // 2  # glibc's default: a fresh mmap, every page faulted again


def test_setting_is_validated_and_accelerator_hosts_are_left_alone(monkeypatch):
    monkeypatch.setenv(hostmem.ENV, "always")
    with pytest.raises(ValueError, match="MELJAX_HOST_MALLOC='always'"):
        hostmem.keep_freed_memory()
    monkeypatch.setenv(hostmem.ENV, "default")
    assert hostmem.keep_freed_memory() == "off"
    monkeypatch.setenv(hostmem.ENV, "auto")
    monkeypatch.setattr(hostmem, "accelerator_present", lambda: True)
    assert hostmem.keep_freed_memory() == "accelerator"


def test_only_train_applies_it(monkeypatch):
    """``meljax train`` is update-bound on CPU; sampling commands measured slower with one
    arena, so they leave glibc alone."""
    import types

    from meljax import cli

    class Imported(Exception):
        pass

    def import_module(name):  # stops the CLI before a command's flags are defined
        raise Imported(name)

    calls = []
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: calls.append(1) or "kept")
    monkeypatch.setattr(cli, "importlib", types.SimpleNamespace(import_module=import_module))
    for command, want in (("sample", 0), ("eval", 0), ("train", 1)):
        with pytest.raises(Imported, match=f"meljax.commands.{command}"):
            cli.run(["meljax", command])
        assert len(calls) == want, command
