"""Masked grouped-query attention: one entry point (``attention``), several implementations.

Shapes (batch ``B``, queries ``T``, query heads ``H``, kv heads ``K``, ``G = H / K``, key slots
``S``, head size ``hd``); keys and values come in the KV-cache layout of ``meljax.models.kv_cache``:

    q         [B, T, H, hd]   compute dtype, not pre-scaled
    k         [B, K, hd, S]   (slots minor)
    v         [B, K, S, hd]
    kv_valid  bool [B, S]     real (non-padding) slots
    q_start   int, or int32 [B]: query ``t`` of row ``b`` sits at slot ``q_start[b] + t``
    result    [B, T, H, hd]

Mask: query ``(b, t)`` sees slot ``s`` iff ``kv_valid[b, s] and s <= q_start[b] + t``; query head
``h`` reads kv head ``h // G``. A query that sees no slot at all (padding) gets a finite output
(a uniform average over slots) and a zero gradient path, never NaN.

Implementations (``impl``):

- ``xla``: dense reference; float32 scores ``[B, K, G*T, S]``. Fastest for short sequences and
  for decoding (``T`` of a few tokens).
- ``chunked``: blockwise flash attention in plain XLA (online softmax over kv blocks inside a
  loop over query blocks) with a custom VJP that recomputes the blocks, so forward and backward
  hold ``O(T * hd)`` plus one ``[block, block]`` score tile, never ``[T, S]``. Blocks entirely
  above the causal diagonal are skipped.
- ``splash``: the TPU Pallas kernel ``jax.experimental.pallas.ops.tpu.splash_attention`` (GQA
  native), causal mask with a static offset, padding through segment ids (real tokens 1,
  padding 0, alignment padding 2), wrapped in ``shard_map`` over the context mesh (rows over
  the batch axes, kv heads over ``tensor``). Needs a static ``q_start`` that is a multiple of
  128; otherwise the call falls back as below. ``interpret=True`` runs it on CPU (tests).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention)
  with the exact mask passed as a boolean ``[B, 1, T, S]`` mask plus ``is_causal`` when the
  start is static (cuDNN then skips blocks above the diagonal). Needs bf16/f16 and
  ``hd <= 128``, ``hd % 8 == 0``. Not runnable on CPU.
- ``auto``: TPU -> ``splash``, GPU -> ``cudnn`` where they apply (``T >= 128``); otherwise, and
  on CPU, ``xla`` below ``T * S < CPU_CHUNKED_MIN_TS`` and ``chunked`` above (measured, see the
  constant). A kernel that does not apply (decoding with a traced start, odd dtypes) falls
  back the same way, so one config value serves training, prefill and decode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from meljax.runtime import sharding as shd
from meljax.runtime.platform import profile

IMPLS = ("auto", "xla", "chunked", "splash", "cudnn")
NEG = -1e30  # finite: a fully masked row gives a uniform softmax, not NaN
# CPU threshold (query x key slots per row) from dense to blockwise: below it the two are a
# wash, above it blockwise is faster and its memory stays flat (docs/performance.md, "CPU
# kernel choices").
CPU_CHUNKED_MIN_TS = 1024 * 1024
MIN_KERNEL_T = 128  # splash / cuDNN pay off from here; shorter calls use the XLA paths


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_valid: jax.Array,
    *,
    q_start: int | jax.Array = 0,
    impl: str = "auto",
    block_size: int = 512,
    interpret: bool = False,
    extra: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Attention output ``[B, T, H, hd]`` (see the module docstring for shapes and mask).

    ``extra`` = ``(k2 [B, K, hd, N], v2 [B, K, N, hd], valid2 bool [B, N])``: ``N`` more key
    slots every query sees where ``valid2`` (no causal mask), in the same softmax: a decode
    segment's own tokens (``meljax.models.kv_cache``, "Decode segments"). It runs the dense
    implementation (decoding: ``T`` of a few tokens).
    """
    if extra is not None:
        starts = jnp.broadcast_to(jnp.asarray(q_start, jnp.int32), (q.shape[0],))
        q_slots = starts[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)[None, :]
        return _dense(q, k, v, kv_valid, q_slots, extra)
    impl = resolve_impl(impl, q, k, q_start)
    b, t = q.shape[:2]
    static = isinstance(q_start, int)
    if impl == "splash":
        return _splash(q, k, v, kv_valid, q_start, interpret=interpret)
    starts = jnp.broadcast_to(jnp.asarray(q_start, jnp.int32), (b,))
    q_slots = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if impl == "cudnn":
        causal = static and q_start == 0 and t == k.shape[-1]
        return _cudnn(q, k, v, kv_valid, q_slots, causal=causal)
    if impl == "chunked":
        return _chunked(q, k, v, kv_valid, q_slots, block_size)
    return _dense(q, k, v, kv_valid, q_slots)


def resolve_impl(impl: str, q: jax.Array, k: jax.Array, q_start) -> str:
    """The implementation ``attention`` runs for these operands (resolves ``auto`` and falls
    back from kernels that do not apply)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}; choose one of {IMPLS}")
    t, s = q.shape[1], k.shape[-1]
    fallback = "chunked" if t > 1 and t * s >= CPU_CHUNKED_MIN_TS else "xla"
    if impl == "auto":
        impl = profile().attention_kernel or fallback
        if impl != fallback and t < MIN_KERNEL_T:
            return fallback
    if impl == "splash" and not (isinstance(q_start, int) and q_start % 128 == 0):
        return fallback
    if impl == "cudnn" and not _cudnn_fits(q):
        return fallback
    return impl


# ----------------------------------------------------------------------------- dense (reference)


def _dense(q, k, v, kv_valid, q_slots, extra=None):
    b, t, h, hd = q.shape
    kv_heads, s = k.shape[1], k.shape[-1]
    g = h // kv_heads
    # queries [B, K, G*T, hd], pre-scaled: batch and kv-head axes lead, so both matmuls read
    # the cache in its stored order (for T == 1 every transpose here is a free reshape)
    qg = q.reshape(b, t, kv_heads, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, hd)
    qg = qg / jnp.asarray(math.sqrt(hd), qg.dtype)
    scores = jnp.einsum("bkqh,bkhs->bkqs", qg, k, preferred_element_type=jnp.float32)
    mask = kv_valid[:, None, :] & (jnp.arange(s)[None, None, :] <= q_slots[:, :, None])
    # the mask as an additive bias [B, 1, 1, T, S] (NEG swamps any score: the same values as a
    # select); XLA:CPU keeps the matmuls as library calls then (faster than a select)
    scores = scores.reshape(b, kv_heads, g, t, s) + jnp.where(mask, 0.0, NEG)[:, None, None]
    # softmax normalised after the value matmul: one pass over [.., S] fewer
    top = jnp.max(scores, axis=-1, keepdims=True)
    if extra is not None:
        # the segment's own keys: their block shares the cache block's max and sum (no
        # [.., S + N] concatenation of scores in memory)
        k2, v2, valid2 = extra
        scores2 = jnp.einsum("bkqh,bkhn->bkqn", qg, k2, preferred_element_type=jnp.float32)
        scores2 = scores2.reshape(b, kv_heads, g, t, -1)
        scores2 = scores2 + jnp.where(valid2, 0.0, NEG)[:, None, None, None, :]
        top = jnp.maximum(top, jnp.max(scores2, axis=-1, keepdims=True))
    top = jax.lax.stop_gradient(top)
    e = jnp.exp(scores - top)
    denom = jnp.sum(e, axis=-1)[..., None]  # [B, K, G, T, 1]
    e = e.astype(q.dtype).reshape(b, kv_heads, g * t, s)
    out = jnp.einsum("bkqs,bksh->bkqh", e, v, preferred_element_type=jnp.float32)
    if extra is not None:
        e2 = jnp.exp(scores2 - top)
        denom = denom + jnp.sum(e2, axis=-1)[..., None]
        e2 = e2.astype(q.dtype).reshape(b, kv_heads, g * t, -1)
        out = out + jnp.einsum("bkqn,bknh->bkqh", e2, v2, preferred_element_type=jnp.float32)
    out = (out.reshape(b, kv_heads, g, t, hd) / denom).astype(q.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


# ----------------------------------------------------------------------------- chunked (flash)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _chunked(q, k, v, kv_valid, q_slots, block_size: int):
    b, t, h, hd = q.shape
    kv_heads, s = k.shape[1], k.shape[-1]
    g = h // kv_heads
    bq = min(block_size, _round_up(t, 8))
    bkv = min(block_size, _round_up(s, 8))
    tp, sp = _round_up(t, bq), _round_up(s, bkv)
    q5 = q.reshape(b, t, kv_heads, g, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, hd]
    if tp > t:
        q5 = jnp.pad(q5, ((0, 0),) * 3 + ((0, tp - t), (0, 0)))
        q_slots = jnp.pad(q_slots, ((0, 0), (0, tp - t)), mode="edge")
    if sp > s:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, sp - s)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
        kv_valid = jnp.pad(kv_valid, ((0, 0), (0, sp - s)))
    out = _flash(q5, k, v, q_slots, kv_valid, bq, bkv)[:, :, :, :t]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


def _blocks(q, k, v, q_slots, kv_valid, bq, bkv):
    """Block-major views: q ``[nq, B, K, G, bq, hd]``, slots ``[nq, B, bq]``, k ``[nk, B, K, hd,
    bkv]``, v ``[nk, B, K, bkv, hd]``, valid ``[nk, B, bkv]``, starts ``[nk]``."""
    b, kh, g, t, hd = q.shape
    s = k.shape[-1]
    nq, nk = t // bq, s // bkv
    qb = q.reshape(b, kh, g, nq, bq, hd).transpose(3, 0, 1, 2, 4, 5)
    sq = q_slots.reshape(b, nq, bq).transpose(1, 0, 2)
    kb = k.reshape(b, kh, hd, nk, bkv).transpose(3, 0, 1, 2, 4)
    vb = v.reshape(b, kh, nk, bkv, hd).transpose(2, 0, 1, 3, 4)
    valid = kv_valid.reshape(b, nk, bkv).transpose(1, 0, 2)
    return qb, sq, kb, vb, valid, jnp.arange(nk, dtype=jnp.int32) * bkv


def _tile_scores(qi, kj, slots, valid, start):
    """Masked, scaled float32 scores ``[B, K, G, bq, bkv]`` of one tile, and its mask."""
    hd = qi.shape[-1]
    s = jnp.einsum("bkgqh,bkhs->bkgqs", qi, kj, preferred_element_type=jnp.float32)
    s = s / math.sqrt(hd)
    kv_slot = start + jnp.arange(kj.shape[-1], dtype=jnp.int32)
    mask = valid[:, None, :] & (kv_slot[None, None, :] <= slots[:, :, None])  # [B, bq, bkv]
    mask = mask[:, None, None]
    return jnp.where(mask, s, NEG), mask


def _flash_forward(q, k, v, q_slots, kv_valid, bq, bkv):
    qb, sq, kb, vb, valid, starts = _blocks(q, k, v, q_slots, kv_valid, bq, bkv)
    b, kh, g, t, hd = q.shape

    def one_q_block(args):
        qi, si = args

        def kv_step(carry, xs):
            kj, vj, valj, start = xs

            def compute(carry):
                m, denom, acc = carry
                s, _ = _tile_scores(qi, kj, si, valj, start)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum(
                    "bkgqs,bksh->bkgqh", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
                )
                return m_new, denom * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

            # a kv block wholly after every query of this block is invisible: skip it
            return jax.lax.cond(start <= jnp.max(si), compute, lambda c: c, carry), None

        init = (
            jnp.full((b, kh, g, bq), NEG, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, hd), jnp.float32),
        )
        (m, denom, acc), _ = jax.lax.scan(kv_step, init, (kb, vb, valid, starts))
        return (acc / denom[..., None]).astype(q.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(one_q_block, (qb, sq))
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(b, kh, g, t, hd)
    return out, lse.transpose(1, 2, 3, 0, 4).reshape(b, kh, g, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, q_slots, kv_valid, bq, bkv):
    """Flash attention on q ``[B, K, G, T, hd]`` (T a multiple of ``bq``, S of ``bkv``)."""
    return _flash_forward(q, k, v, q_slots, kv_valid, bq, bkv)[0]


def _flash_fwd(q, k, v, q_slots, kv_valid, bq, bkv):
    out, lse = _flash_forward(q, k, v, q_slots, kv_valid, bq, bkv)
    return out, (q, k, v, q_slots, kv_valid, out, lse)


def _flash_bwd(bq, bkv, res, d_out):
    q, k, v, q_slots, kv_valid, out, lse = res
    b, kh, g, t, hd = q.shape
    s_len = k.shape[-1]
    nq = t // bq
    f32 = jnp.float32
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # [B, K, G, T]
    qb, sq, kb, vb, valid, starts = _blocks(q, k, v, q_slots, kv_valid, bq, bkv)
    dob = d_out.reshape(b, kh, g, nq, bq, hd).transpose(3, 0, 1, 2, 4, 5)
    lseb = lse.reshape(b, kh, g, nq, bq).transpose(3, 0, 1, 2, 4)
    deltab = delta.reshape(b, kh, g, nq, bq).transpose(3, 0, 1, 2, 4)

    def kv_step(dq_acc, xs):
        kj, vj, valj, start = xs

        def q_step(carry, ys):
            qi, doi, lsei, di, si = ys

            def compute(carry):
                dk, dv = carry
                s, mask = _tile_scores(qi, kj, si, valj, start)
                p = jnp.exp(s - lsei[..., None])
                dv = dv + jnp.einsum(
                    "bkgqs,bkgqh->bksh", p.astype(doi.dtype), doi, preferred_element_type=f32
                )
                dp = jnp.einsum("bkgqh,bksh->bkgqs", doi, vj, preferred_element_type=f32)
                ds = jnp.where(mask, p * (dp - di[..., None]), 0.0) / math.sqrt(hd)
                ds = ds.astype(qi.dtype)
                dk = dk + jnp.einsum("bkgqs,bkgqh->bkhs", ds, qi, preferred_element_type=f32)
                dqi = jnp.einsum("bkgqs,bkhs->bkgqh", ds, kj, preferred_element_type=f32)
                return (dk, dv), dqi

            def skip(carry):
                return carry, jnp.zeros(qi.shape, f32)

            return jax.lax.cond(start <= jnp.max(si), compute, skip, carry)

        zero = (jnp.zeros(kj.shape, f32), jnp.zeros(vj.shape, f32))
        (dk, dv), dq_blocks = jax.lax.scan(q_step, zero, (qb, dob, lseb, deltab, sq))
        return dq_acc + dq_blocks, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_step, jnp.zeros(qb.shape, f32), (kb, vb, valid, starts))
    dq = dq.transpose(1, 2, 3, 0, 4, 5).reshape(b, kh, g, t, hd)
    dk = dk.transpose(1, 2, 3, 0, 4).reshape(b, kh, hd, s_len)
    dv = dv.transpose(1, 2, 0, 3, 4).reshape(b, kh, s_len, hd)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- TPU: splash


def _kernel_block(n: int) -> int:
    return next(bl for bl in (512, 256, 128) if n % bl == 0)


def _splash(q, k, v, kv_valid, q_start: int, *, interpret: bool = False):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, hd = q.shape
    tp = _round_up(t, 128)
    sp = q_start + tp  # slots after q_start + T are invisible: drop them, pad to the queries
    qh = jnp.pad(q / math.sqrt(hd), ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kh = _fit_slots(k.transpose(0, 1, 3, 2), q_start + t, sp, axis=2)  # [B, K, Sp, hd]
    vh = _fit_slots(v, q_start + t, sp, axis=2)
    # segment ids: real slots 1, padding 0, alignment slots 2 (a query only sees its own id,
    # and every query sees at least its own slot, so no softmax row is empty)
    seg = _fit_slots(kv_valid.astype(jnp.int32), q_start + t, sp, axis=1, fill=2)
    q_seg = seg[:, q_start:]

    def local(qh, kh, vh, q_seg, kv_seg):
        heads = qh.shape[1]
        mask = sm.MultiHeadMask([sm.CausalMask((tp, sp), offset=q_start)] * heads)
        bq, bkv = _kernel_block(tp), _kernel_block(sp)
        blocks = sk.BlockSizes(
            block_q=bq,
            block_kv=bkv,
            block_kv_compute=bkv,
            block_q_dkv=bq,
            block_kv_dkv=bkv,
            block_kv_dkv_compute=bkv,
            block_q_dq=bq,
            block_kv_dq=bkv,
        )
        kernel = sk.make_splash_mha(
            mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
        )
        return jax.vmap(lambda a, c, d, e, f: kernel(a, c, d, segment_ids=sk.SegmentIds(e, f)))(
            qh, kh, vh, q_seg, kv_seg
        )

    mesh = shd.context_mesh()
    if mesh is None:
        out = local(qh, kh, vh, q_seg, seg)
    else:
        batch = shd.logical_to_spec(("batch",), None, mesh, (b,))[0]
        heads = shd.logical_to_spec(("kv_heads",), None, mesh, (k.shape[1],))[0]
        qs, ss = PartitionSpec(batch, heads, None, None), PartitionSpec(batch, None)
        out = jax.shard_map(
            local, mesh=mesh, in_specs=(qs, qs, qs, ss, ss), out_specs=qs, check_vma=False
        )(qh, kh, vh, q_seg, seg)
    return out.transpose(0, 2, 1, 3)[:, :t]


def _fit_slots(x, used: int, size: int, *, axis: int, fill=0):
    """``x`` cut to its first ``used`` slots along ``axis`` and padded with ``fill`` to ``size``."""
    x = jax.lax.slice_in_dim(x, 0, min(used, x.shape[axis]), axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=fill)


# ----------------------------------------------------------------------------- GPU: cuDNN


def _cudnn_fits(q) -> bool:
    hd = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and hd <= 128 and hd % 8 == 0


def _cudnn(q, k, v, kv_valid, q_slots, *, causal: bool):
    s = k.shape[-1]
    mask = kv_valid[:, None, :] & (jnp.arange(s)[None, None, :] <= q_slots[:, :, None])
    return jax.nn.dot_product_attention(
        q,
        k.transpose(0, 3, 1, 2),  # [B, S, K, hd]
        v.transpose(0, 2, 1, 3),
        mask=mask[:, None],
        is_causal=causal,
        implementation="cudnn",
    )


def reference_mask(kv_valid: np.ndarray, q_start, t: int) -> np.ndarray:
    """The boolean ``[B, T, S]`` mask of the module docstring, in numpy (for tests)."""
    kv_valid = np.asarray(kv_valid, bool)
    starts = np.broadcast_to(np.asarray(q_start), (kv_valid.shape[0],))
    slots = starts[:, None] + np.arange(t)[None, :]
    return kv_valid[:, None, :] & (np.arange(kv_valid.shape[1])[None, None, :] <= slots[..., None])
