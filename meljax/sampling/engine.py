"""The sampling engine seam: requests in, per-request generations out.

A :class:`Request` is a prompt (token ids), its sampling controls and its group size ``G``
(``sampling.num_samples``); an engine returns, for every request, ``G`` :class:`Generation`
records (tokens, log-probabilities, truncation flag). :class:`meljax.policy.Policy` is the only
caller: it encodes prompts, applies stop strings and decodes text on top of an engine.

:class:`SamplerEngine` is today's engine: the static-batch :class:`~meljax.sampling.Sampler`.
It groups requests with equal sampling controls, and sends each group in calls of at most
``max_rows`` rows (prompts x G), longest prompts first so that the largest shapes compile (or
run out of memory) at once and prompts of similar length share a call. A continuous-batching
engine (a pool of decode slots refilled between segments) plugs in behind the same
:class:`Engine` protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from meljax.sampling.sampler import SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to complete ``sampling.num_samples`` (G) times.

    Attributes:
      prompt_ids: the prompt's token ids, as the model sees them (BOS and template included).
      sampling: the controls of this request; ``num_samples`` is its group size G.
    """

    prompt_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sample of a request, as the engine produced it.

    Attributes:
      tokens: int32 ``[L]`` generated ids, the stop token included when one came.
      logprobs: float32 ``[L]`` ``log_softmax`` of the raw logits at each token (before
        temperature / top-p / top-k), what a training forward pass recomputes.
      truncated: no stop token within ``max_new_tokens``.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    truncated: bool


class Engine(Protocol):
    """What :class:`meljax.policy.Policy` needs from a sampling engine."""

    max_prompt_len: int | None  # longer prompts are cut from the left; None: no limit

    def generate(
        self,
        params: Any,
        requests: Sequence[Request],
        key: jax.Array,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Generation]]:
        """``G`` generations per request, in request order; deterministic in ``key``.

        ``progress(n)`` is called as ``n`` more requests are finished.
        """
        ...


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
    ) -> list[list[Generation]]:
        out: list[list[Generation] | None] = [None] * len(requests)
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
                    Generation(
                        tokens=np.asarray(result.completion(r), np.int32),
                        logprobs=np.asarray(
                            result.logprobs[r, : int(result.lengths[r])], np.float32
                        ),
                        truncated=bool(result.truncated[r]),
                    )
                    for r in rows
                ]
            if progress is not None:
                progress(len(members))
        return out  # type: ignore[return-value]
