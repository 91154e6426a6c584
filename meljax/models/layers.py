"""One decoder layer as a pure function of its weights, and the table of those weights.

Every per-layer weight is stored stacked, ``[num_layers, ...]``, with the logical axis
``"layers"`` first (mapped to no mesh axis). ``decoder_layer`` takes ONE layer's slice (a flat
dict ``name -> array`` without the layer axis) and is what the layer scan / loop runs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from meljax.models import kv_cache
from meljax.models.attention import attention
from meljax.models.config import ModelConfig
from meljax.runtime import sharding as shd
from meljax.runtime.platform import profile

# logical axes of the activations (see meljax.runtime.sharding): rows over the data axes, features of
# the residual stream replicated, heads / MLP features over ``tensor``.
RESIDUAL = ("batch", None, None)
HEADS = ("batch", None, "heads", None)
KV_HEADS = ("batch", None, "kv_heads", None)
MLP = ("batch", None, "mlp")


class WeightInfo(NamedTuple):
    group: str  # nnx sub-module of the layer stack ("" for the stack itself)
    shape: tuple[int, ...]  # one layer's shape
    axes: tuple[str, ...]  # one layer's logical axes
    init: str  # "normal", "zeros" or "ones"


def layer_weights(cfg: ModelConfig) -> dict[str, WeightInfo]:
    """Every per-layer weight: name -> (group, shape, logical axes, initialiser)."""
    d, h, kv, hd, f = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    table = {
        "input_norm": WeightInfo("", (d,), ("norm",), "ones"),
        "post_attn_norm": WeightInfo("", (d,), ("norm",), "ones"),
        "q_proj": WeightInfo("attn", (d, h, hd), ("embed", "heads", "head_dim"), "normal"),
        "k_proj": WeightInfo("attn", (d, kv, hd), ("embed", "kv_heads", "head_dim"), "normal"),
        "v_proj": WeightInfo("attn", (d, kv, hd), ("embed", "kv_heads", "head_dim"), "normal"),
        "o_proj": WeightInfo("attn", (h, hd, d), ("heads", "head_dim", "embed"), "normal"),
        "gate_proj": WeightInfo("mlp", (d, f), ("embed", "mlp"), "normal"),
        "up_proj": WeightInfo("mlp", (d, f), ("embed", "mlp"), "normal"),
        "down_proj": WeightInfo("mlp", (f, d), ("mlp", "embed"), "normal"),
    }
    if cfg.attention_bias:
        table["q_bias"] = WeightInfo("attn", (h, hd), ("heads", "head_dim"), "zeros")
        table["k_bias"] = WeightInfo("attn", (kv, hd), ("kv_heads", "head_dim"), "zeros")
        table["v_bias"] = WeightInfo("attn", (kv, hd), ("kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        table["q_norm"] = WeightInfo("attn", (hd,), ("norm",), "ones")
        table["k_norm"] = WeightInfo("attn", (hd,), ("norm",), "ones")
    return table


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to ``x.dtype`` (as in Hugging Face Llama)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse RoPE frequencies ``[head_dim // 2]`` with optional llama3 / linear scaling."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    if sc["rope_type"] == "linear":
        return inv / sc["factor"]
    # llama3: long wavelengths are slowed by ``factor``, short ones kept, a smooth ramp between.
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[B, T, heads, hd]`` by ``positions`` ``[B, T]`` (rotate-half convention)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class LayerInputs(NamedTuple):
    """What every layer of one forward call shares.

    positions: int32 ``[B, T]``; inv_freq: ``[hd / 2]``; kv_valid: bool ``[B, S']`` over the
    attended slots; q_start / cache_index: slot of the first new token (int or ``[B]``);
    kv_len: attended slots ``S'`` (static); impl / block_size: the attention implementation;
    segment_step: in a decode segment (``kv_cache``, "Decode segments"), the scalar column of
    the segment buffer this step writes (its tokens ``<= segment_step`` are visible).
    """

    positions: jax.Array
    inv_freq: jax.Array
    kv_valid: jax.Array
    cache_index: int | jax.Array
    kv_len: int
    impl: str
    block_size: int
    segment_step: jax.Array | None = None


# A switch over the platform profile's ``weight_matmul_vjp`` (read when a program is traced;
# benchmarks/train_step.py turns it off for its ``+einsum`` variants to measure what it buys).
CPU_MATMUL_VJP = True


def _cpu_matmuls() -> bool:
    """Whether the layer's weight matmuls take the CPU path of :func:`dense`: an unsharded
    program compiled for the CPU (meshes keep the plain einsums the partitioner knows)."""
    return CPU_MATMUL_VJP and shd.context_mesh() is None and profile().weight_matmul_vjp


@jax.custom_vjp
def _matmul_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def _matmul_cpu_fwd(x, w):
    return x @ w, (x, w)


def _matmul_cpu_bwd(res, g):
    # The weight gradient contracts the rows of both operands (``x^T @ g``) in one dot_general:
    # XLA:CPU's matmul library (YNNPACK) takes the transposed left operand as it is. An explicit
    # transpose of ``x`` (materialised, or fused with ``g``'s elementwise producers) only adds
    # a copy (a slower update step).
    x, w = res
    dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))
    return (g @ w.T).astype(x.dtype), dw.astype(w.dtype)


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def dense(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` for a weight ``w`` whose leading axes contract with ``x``'s
    trailing ones (``btd,dhk->bthk``, ``bthk,hkd->btd``, ``btd,df->btf``).

    On an unsharded CPU program the same product runs as one 2-D matmul with a custom VJP
    (see ``_matmul_cpu_bwd``); elsewhere (TPU, GPU, meshes) it is the einsum itself.
    """
    if not _cpu_matmuls():
        return jnp.einsum(spec, x, w)
    ins, out = spec.split("->")
    x_axes, w_axes = ins.split(",")
    n_in = (len(x_axes) + len(w_axes) - len(out)) // 2  # contracted axes
    k = math.prod(w.shape[:n_in])
    y = _matmul_cpu(x.reshape(-1, k), w.reshape(k, -1))
    return y.reshape(*x.shape[: x.ndim - n_in], *w.shape[n_in:])


def cast_weights(cfg: ModelConfig, w: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """One layer's weights in the compute dtype, still laid out like the parameters: the cast
    happens on each shard, so the all-gather before each matmul moves compute-dtype bytes."""
    table = layer_weights(cfg)
    return {n: shd.constrain(x.astype(cfg.dtype), table[n].axes) for n, x in w.items()}


def decoder_layer(
    cfg: ModelConfig,
    w: dict[str, jax.Array],
    x: jax.Array,
    inputs: LayerInputs,
    cache: dict[str, jax.Array] | None = None,
    layer=None,
    segment: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """One pre-norm block on the residual stream ``x`` ``[B, T, D]``.

    ``cache`` is ``None`` (no cache: keys are this call's tokens), one layer's cache dict, or
    the stacked cache with ``layer`` selecting the layer; it is returned updated. With
    ``segment`` (one layer's decode-segment buffer, ``T == 1``) the cache is only read: the
    new keys and values go to column ``inputs.segment_step`` of the buffer, which is returned
    instead of the cache.
    """
    w = cast_weights(cfg, w)
    eps = cfg.rms_norm_eps
    h = rms_norm(x, w["input_norm"], eps)
    q = shd.constrain(dense(h, w["q_proj"], "btd,dhk->bthk"), HEADS)
    k = shd.constrain(dense(h, w["k_proj"], "btd,dhk->bthk"), KV_HEADS)
    v = shd.constrain(dense(h, w["v_proj"], "btd,dhk->bthk"), KV_HEADS)
    if cfg.attention_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], eps)
        k = rms_norm(k, w["k_norm"], eps)
    q = apply_rope(q, inputs.positions, inputs.inv_freq)
    k = apply_rope(k, inputs.positions, inputs.inv_freq)
    extra = None
    if segment is not None:
        step = inputs.segment_step
        segment = {
            "k": kv_cache.write_slots(segment["k"], k, step, "k"),
            "v": kv_cache.write_slots(segment["v"], v, step, "v"),
        }
        keys, values = kv_cache.read_layer(cache, layer, inputs.kv_len)
        keys, values = keys.astype(cfg.dtype), values.astype(cfg.dtype)
        n = kv_cache.cache_len(segment)
        seg_k, seg_v = kv_cache.read_layer(segment, None, n)
        seen = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) <= step, (k.shape[0], n))
        extra = (seg_k.astype(cfg.dtype), seg_v.astype(cfg.dtype), seen)
    elif cache is not None:
        idx = inputs.cache_index
        cache = {
            "k": kv_cache.write_slots(cache["k"], k, idx, "k", layer),
            "v": kv_cache.write_slots(cache["v"], v, idx, "v", layer),
        }
        keys, values = kv_cache.read_layer(cache, layer, inputs.kv_len)
        keys, values = keys.astype(cfg.dtype), values.astype(cfg.dtype)
    else:
        keys, values = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # attention's layout
    out = attention(
        q,
        keys,
        values,
        inputs.kv_valid,
        q_start=inputs.cache_index if cache is not None else 0,
        impl=inputs.impl,
        block_size=inputs.block_size,
        extra=extra,
    )
    out = shd.constrain(out, HEADS)
    x = shd.constrain(x + dense(out, w["o_proj"], "bthk,hkd->btd"), RESIDUAL)
    h = rms_norm(x, w["post_attn_norm"], eps)
    gate = jax.nn.silu(shd.constrain(dense(h, w["gate_proj"], "btd,df->btf"), MLP))
    up = shd.constrain(dense(h, w["up_proj"], "btd,df->btf"), MLP)
    x = shd.constrain(x + dense(gate * up, w["down_proj"], "btf,fd->btd"), RESIDUAL)
    return x, (cache if segment is None else segment)
