"""The sampling seam: what :class:`meljax.sampling.policy.Policy` sends an engine and gets back.

A :class:`Request` is a prompt (token ids), its sampling controls and its group size ``G``
(``sampling.num_samples``); an :class:`Engine` returns, for every request, ``G``
:class:`Completion` records (tokens, log-probabilities, finish reason; the
:class:`~meljax.sampling.policy.Policy` adds the text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging

from meljax.sampling.select import SamplingParams


@dataclasses.dataclass
class EngineStats:
    """Counters of one :meth:`~meljax.sampling.engine.ContinuousEngine.generate` run.

    ``slot_utilisation`` = useful tokens / slot-steps: generated tokens (stop tokens included)
    over ``slots x`` decode steps run (a step advances every slot, finished or not).
    """

    slots: int = 0
    cache_len: int = 0
    useful_tokens: int = 0
    slot_steps: int = 0
    steps: int = 0  # decode steps run (each advances the whole pool)
    segments: int = 0
    prefills: int = 0
    kv_lens: dict[int, int] = dataclasses.field(default_factory=dict)  # bucket -> segments
    pools: dict[int, int] = dataclasses.field(default_factory=dict)  # pool size -> segments

    @property
    def slot_utilisation(self) -> float:
        return self.useful_tokens / self.slot_steps if self.slot_steps else 0.0


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
class Completion:
    """One sample of a request: what the engine generated, then (``Policy``) its text.

    Attributes:
      tokens: int32 ``[L]``: what the model generated and what is trained on: the stop token
        included; when a stop string ended it, up to the token that completed the string.
      logprobs: float32 ``[L]``: ``log_softmax`` of the raw logits at each token (before
        temperature / top-p / top-k), what a training forward pass recomputes.
      text: the decoded answer (special tokens skipped), ending before any stop string;
        ``""`` as the engine returns it (engines see token ids only).
      finish_reason: ``stop`` (a stop token), ``stop_string`` or ``length`` (cut by
        ``max_new_tokens``).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    text: str = ""
    finish_reason: str = "stop"

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


class Engine(Protocol):
    """What :class:`meljax.sampling.policy.Policy` needs from a sampling engine."""

    max_prompt_len: int | None  # longer prompts are cut from the left; None: no limit

    def generate(
        self,
        params: Any,
        requests: Sequence[Request],
        key: jax.Array,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Completion]]:
        """``G`` generations per request, in request order; deterministic in ``key``.

        ``progress(n)`` is called as ``n`` more requests are finished.
        """
        ...


def checked_prompts(
    prompts: Sequence[Sequence[int]], vocab_size: int, max_prompt_len: int | None, who: str
) -> tuple[list[list[int]], int]:
    """Prompts as int lists, each non-empty with ids in ``[0, vocab_size)``, longer ones cut
    from the left to ``max_prompt_len`` (with a warning); errors name ``who`` and the prompt.

    Returns:
      ``(prompts, number_cut)``.
    """
    out, cut = [], 0
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"{who}: prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{who}: prompt {i} has token ids {bad[:5]} outside [0, {vocab_size})")
        if max_prompt_len is not None and len(prompt) > max_prompt_len:
            logging.warning(
                "%s: prompt %d has %d tokens, keeping its last %d",
                who,
                i,
                len(prompt),
                max_prompt_len,
            )
            cut += 1
            prompt = prompt[-max_prompt_len:]
        out.append(prompt)
    return out, cut
