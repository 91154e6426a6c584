"""The persistent compilation cache: where it goes, and a second process compiles nothing new."""

import os
import subprocess
import sys

from meljax.commands import compile_cache
from meljax.models import save_pretrained
from meljax.models.tokenizer import make_tiny_tokenizer
from tests.sampling.test_sampling import tiny_model


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("MELJAX_CACHE", str(tmp_path))
    monkeypatch.setenv("MELJAX_COMPILE_CACHE", "")
    assert compile_cache.cache_path() == str(tmp_path / "jax-compile")
    monkeypatch.setenv("MELJAX_COMPILE_CACHE", str(tmp_path / "cc"))
    assert compile_cache.cache_path() == str(tmp_path / "cc")
    monkeypatch.setenv("MELJAX_COMPILE_CACHE", "off")
    assert compile_cache.cache_path() is None
    monkeypatch.setenv("MELJAX_COMPILE_CACHE", "")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    assert compile_cache.cache_path() is None  # the user's JAX setting rules


def test_a_second_sample_process_loads_every_program_from_the_cache(tmp_path):
    model = tmp_path / "model"
    save_pretrained(tiny_model(), str(model), tokenizer=make_tiny_tokenizer())
    cache = tmp_path / "cc"
    env = dict(os.environ, MELJAX_COMPILE_CACHE=str(cache), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "meljax", "sample", f"--config.model.path={model}"]
    cmd += ["--prompt=hi there", "--config.rollout.max_new_tokens=20"]
    cmd += ["--config.rollout.temperature=0"]
    outs, entries = [], []
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout)
        entries.append(sorted(os.listdir(cache)))
    assert entries[0], "the first process stored nothing"
    assert entries[1] == entries[0]  # the second found every program it needed
    assert outs[1] == outs[0]
