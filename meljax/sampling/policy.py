"""The policy as every caller sees it: question text in, completions (tokens, log-probs, text) out.

:class:`Policy` owns the tokenizer adapter and the sampling engine, so training rollouts, the
MEL analysis and replay passes, evaluation, :func:`meljax.sampling.generate` and
``meljax sample`` all render, encode, stop and decode the same way:

* **prompt rendering** (:class:`PromptConfig`): ``chat`` (the tokenizer's chat template, one user
  turn ``question + instruction``) or ``raw`` (a plain template for base models), with the task
  instruction and an optional system prompt;
* **BOS policy** (``bos``): ``auto`` keeps what a chat template writes and, for raw prompts, adds
  the tokenizer's BOS when its default encoding does; ``always`` / ``never`` force it;
* **stop ids** (:func:`stop_token_ids`): the EOS ids of the tokenizer and the model config and
  the end-of-turn markers of common chat templates, the same for every caller;
* **stop strings**: applied on the host after decoding. A completion is cut after the first
  token whose decoded prefix contains a stop string; tokens and log-probs are cut at the same
  place, so what is trained on is still exactly what the model produced (its log-probs still
  equal a recomputed forward pass), and its text ends before the stop string;
* **pad id**: the tokenizer's, else the first stop id;
* **prompt length** (:func:`prompt_limit`): a prompt keeps at most the model's context less the
  answer budget, and a question prompt at most ``max_prompt_tokens``; longer ones are cut from
  the left (BOS kept), the same way in training, evaluation and sampling, counted in
  :attr:`Policy.prompts_cut` and warned about once per process.

Exactly one place builds the sampling engine: :meth:`Policy.build` (a
:class:`~meljax.sampling.engine.ContinuousEngine`: continuous batching over a pool of decode
slots). The engine sits behind the :class:`~meljax.sampling.engine.Engine` protocol (requests
in, per-request generations out). The policy holds no weights: :meth:`Policy.prepare` casts
and lays the training weights out for decoding (once per update) and every
:meth:`Policy.generate` call takes the prepared weights explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import logging

from meljax.data.prompts import (
    PromptConfig,
    cut_prompt,
    format_prompt,
    prompt_limit,
    resolve_instruction,
)
from meljax.sampling.engine import Completion, ContinuousEngine, Engine, Request
from meljax.sampling.select import SamplingParams, config_from_graphdef

__all__ = [
    "Completion",
    "Policy",
    "Request",
    "pad_token_id",
    "stop_token_ids",
]

# End-of-turn markers of common chat templates; a chat model ends its reply with one of them,
# which is not always the tokenizer's EOS (Llama 3's <|eot_id|> vs <|end_of_text|>).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [int(v) for v in value]
    return [int(value)]


def stop_token_ids(tokenizer: Any, model_config: Any = None) -> list[int]:
    """THE stop ids: EOS of the tokenizer and of the model config, then the end-of-turn markers
    the tokenizer knows as single tokens; deduplicated, ids outside the vocabulary dropped."""
    ids = _ids(getattr(tokenizer, "eos_token_id", None))
    ids += _ids(getattr(model_config, "eos_token_id", None))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids += [int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab]
    size = getattr(model_config, "vocab_size", None)
    return [t for t in dict.fromkeys(ids) if size is None or 0 <= t < size]


_warned_cut = False  # prompt cuts are warned about once per process, then only counted


def _warn_cut(length: int, limit: int, context_len: int | None) -> None:
    global _warned_cut
    if not _warned_cut:
        _warned_cut = True
        logging.warning(
            "a prompt of %d tokens was cut to its last %d (the smaller of data.max_prompt_tokens "
            "and the model's context of %s tokens less max_new_tokens); later cuts are only "
            "counted (training: data/prompts_cut, evaluation: the report's counts)",
            length,
            limit,
            context_len,
        )


def _context_len(engine: Any) -> int | None:
    """The model's context (``max_position_embeddings``) behind an engine, if it tells."""
    for holder in (engine, getattr(engine, "sampler", None)):
        n = getattr(getattr(holder, "config", None), "max_position_embeddings", None)
        if isinstance(n, int):
            return n
    return None


def pad_token_id(tokenizer: Any, stop_ids: Sequence[int]) -> int:
    """The tokenizer's pad id, else the first stop id, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(stop_ids[0]) if stop_ids else 0


class Policy:
    """Tokenizer adapter + sampling engine; see the module docstring.

    Args:
      tokenizer: a Hugging Face tokenizer.
      engine: the sampling engine (:meth:`build` makes the default one).
      prompt: rendering, BOS, stop strings and the question prompt limit.
      stop_ids: the stop token ids the engine was built with (for reference and tests).
      pad_id: the padding id of batches built from this policy's outputs.
    """

    def __init__(
        self,
        tokenizer: Any,
        engine: Engine,
        prompt: PromptConfig = PromptConfig(),
        *,
        stop_ids: Sequence[int] = (),
        pad_id: int = 0,
    ):
        self.tokenizer = tokenizer
        self.engine = engine
        self.prompt = prompt
        self.stop_ids = tuple(int(t) for t in stop_ids)
        self.pad_id = int(pad_id)
        self.instruction = resolve_instruction(prompt.instruction)
        self.context_len = _context_len(engine)  # None: no context rule (test doubles)
        self.prompts_cut = 0  # prompts cut by prompt_limit, over this policy's life
        bos = getattr(tokenizer, "bos_token_id", None)
        self._bos = None if bos is None else int(bos)
        default = list(tokenizer("a")["input_ids"]) if self._bos is not None else []
        self._tokenizer_adds_bos = bool(default) and default[0] == self._bos

    @classmethod
    def build(
        cls,
        graphdef: Any,
        tokenizer: Any,
        prompt: PromptConfig = PromptConfig(),
        *,
        mesh: Any = None,
        cache_dtype: Any = None,
        max_prompt_len: int | None = None,
        **engine: Any,
    ) -> Policy:
        """The policy of a meljax ``Transformer``: THE place the sampling engine is built.

        Args:
          graphdef: ``nnx.split(model)[0]``.
          tokenizer: its tokenizer.
          prompt: see :class:`PromptConfig`.
          mesh, cache_dtype: the training mesh (decoding runs on its inference layout) and
            the KV-cache dtype.
          max_prompt_len: the engine cuts longer prompts from the left (analysis prompts
            are longer than questions); ``None``: no limit.
          **engine: :class:`~meljax.sampling.engine.ContinuousEngine` settings
            (``max_slots``, ``kv_budget_gib``, ``segment_steps``, ``tensor_parallel``).
        """

        stops = stop_token_ids(tokenizer, config_from_graphdef(graphdef))
        if not stops:
            raise ValueError("the tokenizer and the model config name no EOS token to stop at")
        pad = pad_token_id(tokenizer, stops)
        eng = ContinuousEngine(
            graphdef,
            stop_token_ids=stops,
            pad_id=pad,
            mesh=mesh,
            cache_dtype=cache_dtype,
            max_prompt_len=max_prompt_len,
            **engine,
        )
        return cls(tokenizer, eng, prompt, stop_ids=stops, pad_id=pad)

    def prepare(self, params: Any) -> Any:
        """The weights :meth:`generate` takes: ``params`` cast and laid out for decoding by an
        engine with ``prepare`` (the continuous engine), as they are otherwise. Made once per
        update; the caller drops them before the update (they are a second copy)."""
        prepare = getattr(self.engine, "prepare", None)
        return prepare(params) if prepare is not None else params

    @property
    def max_prompt_len(self) -> int | None:
        return self.engine.max_prompt_len

    # -- prompts

    def render(self, question: str) -> str:
        """The full prompt text of a question (template, instruction, system prompt)."""
        return self._format(question, self.instruction)

    def render_message(self, message: str) -> str:
        """The full prompt text of a user message that carries its own instructions (MEL)."""
        return self._format(message, "")

    def _format(self, text: str, instruction: str) -> str:
        p = self.prompt
        return format_prompt(
            text,
            tokenizer=self.tokenizer,
            template=p.prompt_template,
            instruction=instruction,
            system_prompt=p.system_prompt or None,
            raw_template=p.raw_template,
        )

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a rendered prompt, with the BOS policy applied (no length limit)."""
        ids = [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        if self._bos is None:
            return ids
        has = bool(ids) and ids[0] == self._bos
        mode = self.prompt.bos
        want = (mode == "always") or (
            mode == "auto"
            and (has if self.prompt.prompt_template == "chat" else self._tokenizer_adds_bos)
        )
        if want and not has:
            ids = [self._bos] + ids
        elif has and not want:
            ids = ids[1:]
        return ids

    def encode(self, question: str, max_new_tokens: int = 0) -> list[int]:
        """Token ids of a question's prompt, cut by :func:`prompt_limit` (``max_prompt_tokens``
        and the context less ``max_new_tokens``, the answer budget of the call it is for)."""
        ids = self.encode_text(self.render(question))
        limit = prompt_limit(self.prompt.max_prompt_tokens, self.context_len, max_new_tokens)
        return self.cut(ids, limit)

    def cut(self, ids: list[int], limit: int | None) -> list[int]:
        """``ids`` cut from the left to ``limit`` tokens, BOS kept; a cut is counted and
        warned about once per process (the question's end, which asks, is what stays)."""
        if limit is None or len(ids) <= limit:
            return ids
        self.prompts_cut += 1
        _warn_cut(len(ids), limit, self.context_len)
        return cut_prompt(ids, limit, self._bos)

    def encode_message(self, message: str) -> list[int]:
        """Token ids of a user message's prompt (MEL analysis and replay)."""
        return self.encode_text(self.render_message(message))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)

    # -- sampling

    def generate(
        self,
        weights: Any,
        requests: Sequence[Request | Sequence[int]],
        sampling: SamplingParams | None = None,
        key: jax.Array | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Completion]]:
        """``G`` completions per request (rows ``g`` of request ``i`` at ``out[i][g]``).

        Args:
          weights: what :meth:`prepare` returned.
          requests: :class:`Request` objects, or plain prompt ids that take ``sampling``.
          sampling: the controls of plain-id requests.
          key: PRNG key; the same key, weights and requests give the same completions.
          progress: called with the number of requests finished, as they finish.
        """
        if key is None:
            raise ValueError("Policy.generate needs a PRNG key")
        reqs = []
        for r in requests:
            if not isinstance(r, Request):
                if sampling is None:
                    raise ValueError("Policy.generate: plain prompt ids need `sampling`")
                r = Request(tuple(int(t) for t in r), sampling)
            reqs.append(self._fit(r))
        if not reqs:
            return []
        out = self.engine.generate(weights, reqs, key, progress)
        return [[self._finish(g) for g in group] for group in out]

    def _fit(self, request: Request) -> Request:
        """The request with its prompt cut to the context less its ``max_new_tokens``
        (:func:`prompt_limit`): any prompt, MEL messages and plain ids included."""
        limit = prompt_limit(0, self.context_len, request.sampling.max_new_tokens)
        ids = list(request.prompt_ids)
        cut = self.cut(ids, limit)
        return request if cut is ids else dataclasses.replace(request, prompt_ids=tuple(cut))

    def _finish(self, gen) -> Completion:
        tokens, logprobs = gen.tokens, gen.logprobs
        text = self.decode(tokens)
        stops = self.prompt.stop_strings
        if not stops or not any(s in text for s in stops):
            return dataclasses.replace(gen, text=text)

        def hit(n: int) -> bool:
            prefix = self.decode(tokens[:n])
            return any(s in prefix for s in stops)

        lo, hi = 1, len(tokens)  # the shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
        text = self.decode(tokens[:lo])
        cut = min(text.find(s) for s in stops if s in text)
        return Completion(tokens[:lo], logprobs[:lo], text[:cut], "stop_string")
