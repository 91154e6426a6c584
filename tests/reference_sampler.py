"""The static-batch sampler: the REFERENCE the continuous-batching engine is tested against.

Not a product path: every caller samples through :class:`meljax.sampling.policy.Policy` and its
:class:`~meljax.sampling.engine.ContinuousEngine`. This module stays for the tests (token-for-token
parity of the engine with it) and the benchmarks (old vs new in the same run).

One compiled program per (model graph, group size ``G``, bucketed shapes, cache dtype, mesh):

1. prefill every prompt ONCE (batch ``B``, prompts LEFT-padded to ``P``) into a cache of
   ``P + M`` slots (``M`` = bucketed ``max_new_tokens``);
2. repeat the cache, the prompt mask and the last logits ``G`` times along the batch
   (``jnp.repeat``: rows ``i*G .. i*G+G-1`` belong to prompt ``i``);
3. decode in a ``jax.lax.while_loop`` (no Python per token) until every row has emitted a stop
   token or ``max_new_tokens`` tokens have been produced.

Sampling controls (temperature, top-p, top-k, the new-token limit, the stop ids) are traced
values, so changing them never recompiles. ``G`` and the bucketed shapes are static.
Log-probabilities are those of :mod:`meljax.sampling.select` (raw logits).

Stop tokens. A row stops at its own first stop token, which is included in the completion (and
in the mask); later slots hold ``pad_id`` with mask ``False`` and log-prob 0. ``truncated`` marks
rows that reached ``max_new_tokens`` without a stop token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from meljax.models.config import ModelConfig, resolve_dtype
from meljax.models.kv_cache import cache_bytes, init_cache
from meljax.models.transformer import default_positions, prefer_split_layers
from meljax.runtime import sharding as shd
from meljax.runtime.buckets import DEFAULT_BATCH_BUCKETS, DEFAULT_LENGTH_BUCKETS, bucket
from meljax.sampling.protocol import Completion, Request, checked_prompts
from meljax.sampling.select import (
    SamplingParams,
    config_from_graphdef,
    select_tokens,
    token_logprobs,
)
from meljax.sampling.slot_state import cache_map as _cache_map
from meljax.sampling.slot_state import constrain_cache as _constrain_cache
from meljax.sampling.slot_state import constrain_rows as _constrain
from meljax.sampling.slot_state import in_mesh_context as _in_mesh_context

# ----------------------------------------------------------------------------- host-level types


@dataclasses.dataclass
class SampleResult:
    """Completions on the host, only the real prompts' rows (``N`` prompts x ``G`` samples).

    Row ``i*G + g`` is sample ``g`` of prompt ``i``.

    Attributes:
      tokens: int32 ``[N*G, max_new]``; ``pad_id`` after the stop token.
      mask: bool ``[N*G, max_new]``; True on generated tokens (stop token included).
      logprobs: float32 ``[N*G, max_new]``; ``log_softmax(raw logits)`` at each token, 0 off the
        mask (see the module docstring: before temperature / top-p / top-k).
      lengths: int32 ``[N*G]``; number of generated tokens (stop token included).
      truncated: bool ``[N*G]``; True when no stop token came within ``max_new_tokens``.
    """

    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray

    def completion(self, i: int) -> list[int]:
        """Row ``i``'s generated token ids (stop token included, no padding)."""
        return [int(t) for t in self.tokens[i, : int(self.lengths[i])]]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    """Device-side result of the jitted core (padded batch, bucketed length ``M``).

    tokens int32 ``[R, M]``, mask bool ``[R, M]``, logprobs f32 ``[R, M]``, lengths int32 ``[R]``,
    truncated bool ``[R]``, with ``R = B * G`` rows.
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    truncated: jax.Array


# ----------------------------------------------------------------------------- jitted core

_TRACE_COUNT = 0  # bumped each time the core is traced (= compiled); see Sampler.compile_count


@functools.partial(
    jax.jit, static_argnames=("graphdef", "num_samples", "max_len", "cache_dtype", "mesh")
)
@_in_mesh_context
def sample_core(
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    row_valid: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    top_k: jax.Array,
    stop_ids: jax.Array,
    max_new_tokens: jax.Array,
    pad_id: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    num_samples: int,
    max_len: int,
    cache_dtype: Any = None,
    mesh: Mesh | None = None,
) -> SampleOutput:
    """Grouped rollouts: ``num_samples`` completions for each of ``B`` prompts.

    Args:
      params: the model's ``nnx.State`` (``nnx.split(model)[1]``).
      prompt_tokens: int32 ``[B, P]``, LEFT-padded.
      prompt_mask: bool ``[B, P]``; True on real prompt tokens (each row needs at least one).
      row_valid: bool ``[B]``; False on dummy rows added to fill a batch bucket (they start
        finished, so they never hold the loop open).
      key: PRNG key; step ``j`` draws with ``fold_in(key, j)``.
      temperature, top_p, top_k: scalars (see ``select_tokens``).
      stop_ids: int32 ``[S]`` stop token ids (``S`` may be 0).
      max_new_tokens: int32 scalar ``<= max_len``; the loop limit.
      pad_id: int32 scalar written after a row's stop token.
      graphdef: the model's graph definition (static).
      num_samples: group size ``G`` (static).
      max_len: completion buffer length ``M`` (static; cache holds ``P + M`` slots).
      cache_dtype: KV-cache dtype (static; default: the model's compute dtype).
      mesh: when given, batch-major arrays are constrained to the data axes (static).

    Returns:
      ``SampleOutput`` with ``R = B * G`` rows and ``M`` columns.
    """
    global _TRACE_COUNT
    _TRACE_COUNT += 1
    model = nnx.merge(graphdef, params)
    cfg: ModelConfig = model.cfg
    g, m = num_samples, max_len
    b, p = prompt_tokens.shape
    r = b * g

    # Completion slots are marked valid from the start: a query at slot ``P + j`` only sees
    # slots <= P + j (causality inside forward_hidden), all of which are written by then.
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((b, m), bool)], axis=1)
    positions = default_positions(prompt_mask)
    # On CPU the layers run unrolled over per-layer weight copies (made once per call, in the
    # compute dtype) and a split cache; elsewhere scanned over the stacked ones.
    split = prefer_split_layers()
    layers = model.split_layers(cfg.dtype) if split else None
    cache = _cache_map(_constrain_cache, init_cache(cfg, b, p + m, cache_dtype, stacked=not split))
    hidden, cache = model.prefill(
        prompt_tokens, positions, kv_mask, cache, cfg.prefill_chunk_size, layers=layers
    )
    first_logits = model.project_rows(hidden[:, -1])  # [B, V]

    def rep(x):
        return _constrain(jnp.repeat(x, g, axis=0), mesh)

    cache = _cache_map(
        lambda c, ax, name: _constrain_cache(jnp.repeat(c, g, axis=ax), ax, name), cache
    )
    kv_mask = rep(kv_mask)
    logits = rep(first_logits)
    next_pos = rep(prompt_mask.sum(axis=1).astype(jnp.int32))  # position of completion token 0
    done = rep(~row_valid)

    def choose(step, logits, done):
        """Samples completion token ``step`` for every row; returns its column and new state."""
        tok = select_tokens(logits, jax.random.fold_in(key, step), temperature, top_p, top_k)
        lp = token_logprobs(logits, tok)
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        lp = jnp.where(live, lp, 0.0)
        stopped = (tok[:, None] == stop_ids[None, :]).any(axis=-1)
        return tok, lp, live, done | (live & stopped)

    def write(buf, col, step):
        return jax.lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, step))

    tokens = _constrain(jnp.full((r, m), pad_id, jnp.int32), mesh)
    logps = _constrain(jnp.zeros((r, m), jnp.float32), mesh)
    mask = _constrain(jnp.zeros((r, m), bool), mesh)

    def cond(state):
        step, _, _, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        # Sample completion token ``step`` from ``logits``, then feed it (cache slot P+step) to
        # get the logits of token step+1, unless the loop ends here. One sampling site keeps
        # the program (and its compile time) small.
        step, logits, cache, tokens, logps, mask, done = state
        tok, lp, live, done = choose(step, logits, done)
        tokens = write(tokens, tok, step)
        logps = write(logps, lp, step)
        mask = write(mask, live, step)

        def feed(operands):
            logits, cache = operands
            pos = (next_pos + step)[:, None]
            hidden, cache = model.forward_hidden(
                tok[:, None], pos, kv_mask, cache, p + step, layers=layers
            )
            return model.project_rows(hidden[:, 0]), cache

        more = (step + 1 < max_new_tokens) & ~jnp.all(done)
        logits, cache = jax.lax.cond(more, feed, lambda operands: operands, (logits, cache))
        return step + 1, logits, cache, tokens, logps, mask, done

    state = (jnp.int32(0), logits, cache, tokens, logps, mask, done)
    _, _, _, tokens, logps, mask, done = jax.lax.while_loop(cond, body, state)
    return SampleOutput(
        tokens=_constrain(tokens, mesh),
        mask=_constrain(mask, mesh),
        logprobs=_constrain(logps, mesh),
        lengths=_constrain(mask.sum(axis=1).astype(jnp.int32), mesh),
        truncated=_constrain(~done, mesh),
    )


# ----------------------------------------------------------------------------- host-level sampler


def pad_prompts(
    prompts: Sequence[Sequence[int]], batch: int, length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LEFT-pads prompts into ``tokens`` int32 ``[batch, length]``, ``mask`` bool and ``valid``.

    Rows past ``len(prompts)`` are dummies: a single ``pad_id`` token in the last slot (so that
    attention never sees an all-masked row) and ``valid`` False.
    """
    tokens = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), bool)
    valid = np.zeros((batch,), bool)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[i, length - n :] = prompt
        mask[i, length - n :] = True
        valid[i] = True
    mask[len(prompts) :, -1] = True
    return tokens, mask, valid


class Sampler:
    """Host-level grouped sampler: buckets shapes, pads the batch, runs ``sample_core``.

    Prompts longer than ``max_prompt_len`` are cut from the LEFT (their end, which holds the
    question and the generation prompt, is kept); each cut is logged and counted in
    ``num_truncated_prompts``. Empty prompts and token ids outside the vocabulary raise.

    With a ``mesh`` the batch is padded to a multiple of the data-parallel size and the inputs
    are placed batch-sharded; ``params`` must already be laid out for that mesh (e.g. loaded by
    ``from_pretrained(..., mesh=mesh)``).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        *,
        stop_token_ids: Sequence[int],
        pad_id: int,
        mesh: Mesh | None = None,
        cache_dtype=None,
        prompt_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        max_prompt_len: int | None = None,
        new_token_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
    ):
        """
        Args:
          graphdef: ``nnx.split(model)[0]`` of a meljax ``Transformer``.
          stop_token_ids: a row stops after emitting any of these (may be empty).
          pad_id: token written after a row's stop token and into prompt padding.
          mesh: optional device mesh; the batch is sharded over its data axes.
          cache_dtype: KV-cache dtype (``"bfloat16"`` halves its memory); default: compute dtype.
          prompt_buckets, batch_buckets: sizes the prompt length / prompt count are padded to.
          max_prompt_len: longer prompts are cut from the left; ``None``: no limit. The limit
            is also the largest prompt bucket (a limit of 6144 pads to 6144, not 8192).
          new_token_buckets: sizes ``max_new_tokens`` is padded to for the cache and output
            buffers (the loop still stops at ``max_new_tokens``); ``None``: exact size.
        """
        self.graphdef = graphdef
        self.config = config_from_graphdef(graphdef)
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.pad_id = int(pad_id)
        self.mesh = mesh
        self.cache_dtype = None if cache_dtype is None else resolve_dtype(cache_dtype)
        self.prompt_buckets = tuple(prompt_buckets)
        self.batch_buckets = tuple(batch_buckets)
        self.new_token_buckets = None if new_token_buckets is None else tuple(new_token_buckets)
        self.max_prompt_len = max_prompt_len
        self.compile_count = 0
        self.num_truncated_prompts = 0
        vocab = self.config.vocab_size
        for t in (*self.stop_token_ids, self.pad_id):
            if not 0 <= t < vocab:
                raise ValueError(
                    f"Sampler: stop/pad token id {t} outside the vocabulary [0, {vocab})"
                )

    # -- shapes

    def _dp(self) -> int:
        return 1 if self.mesh is None else shd.data_parallel_size(self.mesh)

    def shapes(
        self, num_prompts: int, prompt_len: int, sampling: SamplingParams
    ) -> tuple[int, int, int]:
        """Bucketed ``(batch, prompt_len, new_tokens)`` a call with these sizes compiles for.

        The ROWS (``batch * G``) are padded to a multiple of the data-parallel size, not the
        prompts: 128 prompts x G=8 on 256 chips stay 128 prompts (1,024 rows).
        """
        if self.max_prompt_len is not None:
            prompt_len = min(prompt_len, self.max_prompt_len)
        dp = self._dp()
        multiple = dp // math.gcd(dp, sampling.num_samples)
        b = bucket(max(num_prompts, 1), self.batch_buckets, multiple=multiple)
        p = bucket(prompt_len, self.prompt_buckets)
        if self.max_prompt_len is not None:  # the limit is the top bucket: 6144 stays 6144
            p = min(p, self.max_prompt_len)
        m = sampling.max_new_tokens
        if self.new_token_buckets is not None:
            m = bucket(m, self.new_token_buckets)
        return b, p, m

    def memory_estimate(
        self, num_prompts: int, prompt_len: int, sampling: SamplingParams
    ) -> dict[str, int]:
        """Device memory of the sampling buffers in bytes (weights excluded).

        Keys: ``batch`` (padded prompts), ``rows`` (``batch * G``), ``prompt_len`` and
        ``new_tokens`` (bucketed), ``cache_len``, ``kv_cache_bytes`` (the repeated cache,
        ``rows x cache_len``), ``prefill_cache_bytes`` (the cache before repetition, alive
        during the repeat), ``logits_bytes`` (f32 ``[rows, vocab]``), ``output_bytes`` and
        ``total_bytes`` (their sum).
        """
        b, p, m = self.shapes(num_prompts, prompt_len, sampling)
        rows = b * sampling.num_samples
        cfg = self.config
        kv = cache_bytes(cfg, rows, p + m, self.cache_dtype)
        prefill = cache_bytes(cfg, b, p + m, self.cache_dtype)
        logits = rows * cfg.vocab_size * 4
        outputs = rows * m * (4 + 4 + 1)
        return {
            "batch": b,
            "rows": rows,
            "prompt_len": p,
            "new_tokens": m,
            "cache_len": p + m,
            "kv_cache_bytes": kv,
            "prefill_cache_bytes": prefill,
            "logits_bytes": logits,
            "output_bytes": outputs,
            "total_bytes": kv + prefill + logits + outputs,
        }

    # -- sampling

    def _prepare(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        prompts, cut = checked_prompts(
            prompts, self.config.vocab_size, self.max_prompt_len, "Sampler.sample"
        )
        self.num_truncated_prompts += cut
        return prompts

    def sample_device(
        self,
        params,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        key: jax.Array,
    ) -> SampleOutput:
        """Runs the jitted core; returns the padded device-side ``SampleOutput``."""
        global _TRACE_COUNT
        sampling.validate()
        if not prompts:
            raise ValueError("Sampler.sample: no prompts")
        prompts = self._prepare(prompts)
        b, p, m = self.shapes(len(prompts), max(len(x) for x in prompts), sampling)
        tokens, mask, valid = pad_prompts(prompts, b, p, self.pad_id)
        if self.mesh is not None:
            # Fewer prompts than data-parallel shards: the (small) prompt arrays are replicated
            # and the prefill is spread unevenly; the G-times repeated rows divide evenly.
            split = b % self._dp() == 0
            tokens, mask, valid = (
                shd.put_global(
                    x, shd.batch_sharding(self.mesh, x.ndim) if split else shd.replicated(self.mesh)
                )
                for x in (tokens, mask, valid)
            )
        before = _TRACE_COUNT
        out = self._call_core(sample_core, params, tokens, mask, valid, sampling, key, m)
        self.compile_count += _TRACE_COUNT - before
        return out

    def _call_core(self, fn, params, tokens, mask, valid, sampling: SamplingParams, key, m: int):
        """``fn`` is ``sample_core`` (run) or ``sample_core.lower`` (ahead-of-time)."""
        return fn(
            params,
            tokens,
            mask,
            valid,
            key,
            jnp.float32(sampling.temperature),
            jnp.float32(sampling.top_p),
            jnp.int32(sampling.top_k),
            jnp.asarray(self.stop_token_ids, jnp.int32).reshape(-1),
            jnp.int32(sampling.max_new_tokens),
            jnp.int32(self.pad_id),
            graphdef=self.graphdef,
            num_samples=sampling.num_samples,
            max_len=m,
            cache_dtype=self.cache_dtype,
            mesh=self.mesh,
        )

    def lower(self, params, num_prompts: int, prompt_len: int, sampling: SamplingParams):
        """The program ``sample`` would compile for ``num_prompts`` prompts of up to
        ``prompt_len`` tokens, lowered ahead of time (``.compile()`` it). ``params`` may be
        abstract (``jax.ShapeDtypeStruct`` leaves with shardings): nothing is allocated."""
        sampling.validate()
        b, p, m = self.shapes(num_prompts, prompt_len, sampling)

        split = b % self._dp() == 0  # as in sample_device: fewer prompts than shards replicate

        def spec(shape, dtype):
            sharding = None
            if self.mesh is not None:
                rank = len(shape)
                sharding = (
                    shd.batch_sharding(self.mesh, rank) if split else shd.replicated(self.mesh)
                )
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        inputs = spec((b, p), jnp.int32), spec((b, p), jnp.bool_), spec((b,), jnp.bool_)
        key = jax.random.key(0)
        return self._call_core(sample_core.lower, params, *inputs, sampling, key, m)

    def sample(
        self,
        params,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        key: jax.Array,
    ) -> SampleResult:
        """``sampling.num_samples`` completions per prompt, as numpy (rows ``i*G + g``).

        Args:
          params: the model's current ``nnx.State``.
          prompts: token-id lists (no padding), each non-empty.
          sampling: the controls; ``temperature``/``top_p``/``top_k``/``max_new_tokens`` (within
            one bucket) change without recompiling.
          key: PRNG key; the same key, params and prompts give the same result.
        """
        out = self.sample_device(params, prompts, sampling, key)
        rows, m = len(prompts) * sampling.num_samples, sampling.max_new_tokens
        host = shd.to_host(out)  # all-gathers rows held by other hosts (multi-host)
        return SampleResult(
            tokens=np.asarray(host.tokens[:rows, :m], np.int32),
            mask=np.asarray(host.mask[:rows, :m], bool),
            logprobs=np.asarray(host.logprobs[:rows, :m], np.float32),
            lengths=np.asarray(host.lengths[:rows], np.int32),
            truncated=np.asarray(host.truncated[:rows], bool),
        )


# ----------------------------------------------------------------------------- engine adapter


class SamplerEngine:
    """:class:`Engine` over a static-batch sampler (anything with ``Sampler.sample``'s API).

    Args:
      sampler: a :class:`~meljax.sampling.Sampler` (tests may pass a scripted one).
      max_rows: most rows (prompts x G) in one sampler call; 0: no limit (one call per group
        of equal sampling controls).
    """

    def __init__(self, sampler: Any, *, max_rows: int = 0):
        if max_rows < 0:
            raise ValueError(f"SamplerEngine: max_rows must be >= 0, got {max_rows}")
        self.sampler = sampler
        self.max_rows = max_rows

    @property
    def max_prompt_len(self) -> int | None:
        return getattr(self.sampler, "max_prompt_len", None)

    def _calls(self, requests: Sequence[Request]) -> list[tuple[SamplingParams, list[int]]]:
        """``(sampling, request indices)`` of each sampler call, in a fixed order."""
        groups: dict[SamplingParams, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.sampling, []).append(i)
        calls = []
        for sampling, members in groups.items():
            per_call = len(members)
            if self.max_rows:
                per_call = max(1, self.max_rows // sampling.num_samples)
            if per_call < len(members):  # several calls: longest first, similar lengths together
                members = sorted(members, key=lambda i: -len(requests[i].prompt_ids))
            calls += [
                (sampling, members[lo : lo + per_call]) for lo in range(0, len(members), per_call)
            ]
        return calls

    def generate(
        self,
        params: Any,
        requests: Sequence[Request],
        key: jax.Array,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Completion]]:
        out: list[list[Completion] | None] = [None] * len(requests)
        calls = self._calls(requests)
        for c, (sampling, members) in enumerate(calls):
            call_key = key if len(calls) == 1 else jax.random.fold_in(key, c)
            result = self.sampler.sample(
                params, [requests[i].prompt_ids for i in members], sampling, call_key
            )
            g = sampling.num_samples
            if len(result) != len(members) * g:
                raise RuntimeError(
                    f"sampler returned {len(result)} rows for {len(members)} prompts x {g}"
                )
            for j, i in enumerate(members):
                rows = range(j * g, (j + 1) * g)
                out[i] = [
                    Completion(
                        tokens=np.asarray(result.completion(r), np.int32),
                        logprobs=np.asarray(
                            result.logprobs[r, : int(result.lengths[r])], np.float32
                        ),
                        finish_reason="length" if result.truncated[r] else "stop",
                    )
                    for r in rows
                ]
            if progress is not None:
                progress(len(members))
        return out  # type: ignore[return-value]
