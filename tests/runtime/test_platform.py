"""Every platform-dependent default reads the one platform profile (meljax.runtime.platform)."""

import dataclasses

import jax.numpy as jnp

from meljax.models import attention, kv_cache, layers, transformer
from meljax.runtime import platform


def test_profiles_by_name():
    assert platform.profile("cuda") is platform.PROFILES["gpu"]
    assert platform.profile("tpu").attention_kernel == "splash"
    assert platform.profile() is platform.PROFILES["cpu"]  # these tests run on the CPU
    cpu = platform.PROFILES["cpu"].describe()
    assert cpu.startswith("cpu: ") and "tail shrink on" in cpu


def test_model_defaults_follow_the_profile(monkeypatch):
    q = jnp.zeros((1, 256, 4, 8))
    k = jnp.zeros((1, 2, 8, 256))
    cpu = (kv_cache.layout(), transformer.prefer_split_layers(), layers._cpu_matmuls())
    assert cpu == ("heads", True, True)
    assert attention.resolve_impl("auto", q, k, 0) in ("xla", "chunked")
    # the same host under the TPU profile: every reader switches
    monkeypatch.setitem(platform.PROFILES, "cpu", platform.PROFILES["tpu"])
    assert kv_cache.layout() == "hd_minor"
    assert transformer.prefer_split_layers() is False
    assert layers._cpu_matmuls() is False
    assert transformer.resolve_remat("auto") is not None  # "full"
    assert attention.resolve_impl("auto", q, k, 0) == "splash"


def test_engine_defaults_follow_the_profile(monkeypatch):
    from flax import nnx

    from meljax.sampling import ContinuousEngine
    from tests.sampling.test_sampling import PAD, tiny_model

    graphdef = nnx.split(tiny_model())[0]
    eng = ContinuousEngine(graphdef, stop_token_ids=[1], pad_id=PAD)
    assert (eng.split, eng.segment_buffer, eng.kv_buckets, eng.shrink_tail) == (
        True,
        False,
        (),
        True,
    )
    tpu_like = dataclasses.replace(platform.PROFILES["tpu"], platform="cpu")
    monkeypatch.setitem(platform.PROFILES, "cpu", tpu_like)
    eng = ContinuousEngine(graphdef, stop_token_ids=[1], pad_id=PAD)
    assert eng.split is False and eng.segment_buffer is True and eng.shrink_tail is False
    assert eng.kv_buckets == tpu_like.kv_buckets
    # an explicit argument still wins
    eng = ContinuousEngine(graphdef, stop_token_ids=[1], pad_id=PAD, shrink_tail=True)
    assert eng.shrink_tail is True
