"""Attention implementations against the dense reference: values, gradients, masks, dispatch."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from meljax.runtime import sharding as shd

attn = importlib.import_module("meljax.models.attention")


def operands(b=3, t=37, h=4, k=2, hd=8, s=None, seed=0):
    rng = np.random.default_rng(seed)
    s = t if s is None else s
    q = jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, k, hd, s)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(b, k, s, hd)), jnp.float32)
    valid = np.ones((b, s), bool)
    valid[1, :5] = False  # left padding
    if b > 2:
        valid[2, t - 7 :] = False  # right padding
    return q, keys, values, jnp.asarray(valid)


def numpy_attention(q, k, v, valid, q_start):
    """Float64 reference written from the mask definition of the module docstring."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, hd = q.shape
    g = h // k.shape[1]
    mask = attn.reference_mask(valid, q_start, t)  # [B, T, S]
    out = np.zeros(q.shape)
    for head in range(h):
        s = np.einsum("btd,bds->bts", q[:, :, head], k[:, head // g]) / np.sqrt(hd)
        s = np.where(mask, s, -np.inf)
        with np.errstate(invalid="ignore"):  # rows without any visible slot: NaN, unused
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bts,bsd->btd", p, v[:, head // g])
    return out, mask.any(-1)


def _loss(impl, valid, **kw):
    def f(q, k, v):
        o = attn.attention(q, k, v, valid, impl=impl, **kw)
        seen = jnp.asarray(attn.reference_mask(valid, kw.get("q_start", 0), q.shape[1]).any(-1))
        return jnp.sum(jnp.where(seen[:, :, None, None], o * jnp.sin(o), 0.0))

    return f


@pytest.mark.parametrize("block", [8, 16, 512])
def test_chunked_matches_dense_values_and_gradients(block):
    q, k, v, valid = operands()
    ref, seen = numpy_attention(q, k, v, valid, 0)
    for impl in ("xla", "chunked"):
        out = np.asarray(attn.attention(q, k, v, valid, impl=impl, block_size=block))
        assert np.isfinite(out).all(), impl  # fully padded query rows give no NaN
        np.testing.assert_allclose(out[seen], ref[seen], atol=2e-6, err_msg=impl)
    g_dense = jax.grad(_loss("xla", valid), argnums=(0, 1, 2))(q, k, v)
    g_chunk = jax.grad(_loss("chunked", valid, block_size=block), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_dense, g_chunk, strict=True):
        assert np.isfinite(np.asarray(b)).all()
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start", [6, "rows"])
def test_cached_queries_with_offsets(start):
    """Queries at slots ``q_start + t`` of a longer cache (decode / chunked prefill), one start
    for all rows or one per row."""
    q, k, v, valid = operands(t=5, s=41, seed=1)
    valid = valid.at[0, 30:].set(False)
    q_start = 6 if start == 6 else jnp.asarray([3, 17, 30], jnp.int32)
    ref, seen = numpy_attention(q, k, v, valid, np.asarray(q_start))
    for impl in ("xla", "chunked"):
        out = np.asarray(attn.attention(q, k, v, valid, q_start=q_start, impl=impl, block_size=8))
        np.testing.assert_allclose(out[seen], ref[seen], atol=2e-6, err_msg=impl)


def test_splash_interpret_matches_dense():
    """The TPU Pallas kernel, run by the Pallas interpreter on CPU: values and gradients, with
    padding (segment ids), GQA and a length that is not a multiple of its 128 block."""
    q, k, v, valid = operands(b=2, t=100, h=4, k=2, hd=64)
    ref = np.asarray(attn.attention(q, k, v, valid, impl="xla"))
    out = np.asarray(attn._splash(q, k, v, valid, 0, interpret=True))
    seen = np.asarray(valid)
    np.testing.assert_allclose(out[seen], ref[seen], atol=1e-5)

    def loss(q, k, v):
        o = attn._splash(q, k, v, valid, 0, interpret=True)
        return jnp.sum(jnp.where(valid[:, :, None, None], o * jnp.sin(o), 0.0))

    g_ref = jax.grad(_loss("xla", valid), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def tpu_topology_mesh(topology: str, shape: dict):
    """A mesh over the devices of a TPU topology (libtpu's compiler runs on this CPU host)."""
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # no libtpu in this environment
        pytest.skip(f"no TPU compiler here: {e}")
    return shd.make_mesh(shape, devices=topo.devices)


@pytest.mark.slow
def test_splash_compiles_for_tpu_under_shard_map():
    """Forward and backward of the splash path, sharded over a v5p topology (rows over fsdp,
    kv heads over tensor), compile with the real TPU compiler; the program holds the Pallas
    kernels and no collective (each shard attends locally)."""
    from meljax.plan import hlo

    mesh = tpu_topology_mesh("v5p:2x2x1", {"data": 1, "fsdp": 2, "tensor": 2})
    b, t, h, k, hd = 4, 256, 8, 2, 128
    s = jax.ShapeDtypeStruct
    spec = jax.sharding.NamedSharding
    P = jax.sharding.PartitionSpec
    q = s((b, t, h, hd), jnp.bfloat16, sharding=spec(mesh, P("fsdp", None, "tensor", None)))
    keys = s((b, k, hd, t), jnp.bfloat16, sharding=spec(mesh, P("fsdp", "tensor", None, None)))
    values = s((b, k, t, hd), jnp.bfloat16, sharding=spec(mesh, P("fsdp", "tensor", None, None)))
    valid = s((b, t), jnp.bool_, sharding=spec(mesh, P("fsdp", None)))

    def loss(q, k, v, valid):
        with shd.use_mesh(mesh):
            o = attn.attention(q, k, v, valid, impl="auto")  # TPU mesh in context: splash
            return jnp.sum(o.astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, keys, values, valid).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text and "splash" in text
    assert not [c for c in hlo.collectives(text) if c.bytes > 4096]


def _tpu_mesh_context():
    """An abstract mesh of TPU devices in context (what an AOT compile for a topology sets)."""
    from jax._src.mesh import AbstractDevice  # no public constructor in jax 0.10

    return jax.sharding.use_abstract_mesh(
        AbstractMesh(
            (1, 4, 1),
            shd.MESH_AXES,
            abstract_device=AbstractDevice(device_kind="TPU v5p", num_cores=None, platform="tpu"),
        )
    )


def test_auto_dispatch():
    q_long = jnp.zeros((1, 2048, 4, 8))
    k_long = jnp.zeros((1, 2, 8, 2048))
    q_short, k_short = q_long[:, :64], k_long[..., :64]
    # CPU: dense for short calls and decoding, blockwise above the measured threshold
    assert attn.resolve_impl("auto", q_short, k_short, 0) == "xla"
    assert attn.resolve_impl("auto", q_long, k_long, 0) == "chunked"
    assert attn.resolve_impl("auto", q_long[:, :1], k_long, jnp.zeros(1, jnp.int32)) == "xla"
    # kernels that cannot apply fall back: splash needs a static start on a 128 boundary,
    # cuDNN needs bf16 / f16
    assert attn.resolve_impl("splash", q_long, k_long, jnp.zeros(1, jnp.int32)) == "chunked"
    assert attn.resolve_impl("splash", q_long, k_long, 64) == "chunked"
    assert attn.resolve_impl("splash", q_long, k_long, 128) == "splash"
    assert attn.resolve_impl("cudnn", q_long, k_long, 0) == "chunked"
    assert attn.resolve_impl("cudnn", q_long.astype(jnp.bfloat16), k_long, 0) == "cudnn"
    with _tpu_mesh_context():
        assert shd.current_platform() == "tpu"
        assert attn.resolve_impl("auto", q_long, k_long, 0) == "splash"
        assert attn.resolve_impl("auto", q_short, k_short, 0) == "xla"  # below the kernel size
    with pytest.raises(ValueError, match="choose one of"):
        attn.resolve_impl("flash", q_short, k_short, 0)
