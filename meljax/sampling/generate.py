"""Text in, text out through :class:`meljax.sampling.policy.Policy`: notebooks, ``meljax sample``, checks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from meljax.sampling.select import SamplingParams


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    chat: bool | None = None,
    prompt: Any = None,
    max_slots: int = 0,
) -> list[list[str]]:
    """Samples ``num_samples`` completions for each prompt string.

    Args:
      model: a meljax ``Transformer``.
      tokenizer: its Hugging Face tokenizer (``meljax.models.load_tokenizer``).
      prompts: prompt texts (questions when ``prompt`` renders them with an instruction).
      num_samples, max_new_tokens, temperature, top_p, top_k: see ``SamplingParams``
        (``temperature=0`` is greedy).
      seed: PRNG seed; the same seed gives the same completions.
      chat: without ``prompt``: one user turn of the chat template (``True``) or the bare text
        (``False``); ``None``: the chat template when the tokenizer has one (base models: raw).
      prompt: a :class:`meljax.sampling.policy.PromptConfig` (e.g. a training run's ``data`` settings),
        so the prompts, BOS and stops are exactly those of training.
      max_slots: most decode slots (0: one per sample; fewer bound the KV cache, and the
        samples that do not fit wait for free slots).

    Returns:
      One list of ``num_samples`` completion texts per prompt (special tokens stripped, cut
      before any stop string). Generation stops at the policy's stop tokens.
    """
    from meljax.sampling.policy import Policy, PromptConfig

    if not prompts:
        return []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    elif chat and prompt is None and not has_template:
        raise ValueError("generate(chat=True): the tokenizer has no chat template; use chat=False")
    graphdef, params = nnx.split(model)
    # every engine program, the weights' re-layout included, is cached on the graph definition
    # and the shapes, so a fresh policy per call compiles nothing a previous call compiled
    policy = Policy.build(
        graphdef, tokenizer, prompt or PromptConfig.plain(chat), max_slots=max_slots
    )
    policy.set_params(params)
    sampling = SamplingParams(max_new_tokens, temperature, top_p, top_k, num_samples)
    ids = [policy.encode(p, max_new_tokens) for p in prompts]  # cut once, by the one rule
    out = policy.generate(ids, sampling, jax.random.key(seed))
    return [[c.text for c in group] for group in out]


def sample_model(
    model_path: str,
    prompts: Sequence[str],
    sampling: SamplingParams,
    *,
    seed: int = 0,
    dtype: str = "float32",
    cache_dtype: str | None = None,
    chat: bool = True,
    prompt: Any = None,
    echo: Callable[[str], Any] = print,
) -> list[list[str]]:
    """The ``meljax sample`` command without its flags: load, sample, print, return the texts.

    Args:
      model_path: a Hugging Face folder, a ``.gguf`` file, ``gs://...``, a hub id or ``demo``.
      prompts: prompt texts (at least one).
      sampling: the sampling controls.
      seed, dtype, cache_dtype, chat: PRNG seed, compute dtype, KV-cache dtype (``None``: the
        compute dtype), chat-template wrapping (when ``prompt`` is not given).
      prompt: a :class:`meljax.sampling.policy.PromptConfig` (rendering, BOS, stop strings).
      echo: where the lines go (``print`` by default).

    Prints each completion (with its token count and a ``[truncated]`` mark) and the engine's
    slot pool of the call (slots, cache length, KV memory); returns one list of completions
    per prompt.

    Raises:
      ValueError: no prompt or bad sampling controls; FileNotFoundError: no such model.
    """
    from meljax.models import from_pretrained, load_tokenizer, resolve_model_path
    from meljax.sampling.policy import Policy, PromptConfig

    if not prompts:
        raise ValueError("give at least one --prompt")
    sampling.validate()
    path = resolve_model_path(model_path)  # FileNotFoundError naming what was looked for
    model = from_pretrained(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    graphdef, params = nnx.split(model)
    policy = Policy.build(
        graphdef, tokenizer, prompt or PromptConfig.plain(chat), cache_dtype=cache_dtype
    )
    policy.set_params(params)
    prompt_ids = [policy.encode(p, sampling.max_new_tokens) for p in prompts]
    pool = policy.engine.describe(
        len(prompt_ids) * sampling.num_samples,
        max(len(p) for p in prompt_ids),
        sampling.max_new_tokens,
    )
    result = policy.generate(prompt_ids, sampling, jax.random.key(seed))

    out: list[list[str]] = []
    for i, (text_in, group) in enumerate(zip(prompts, result, strict=True)):
        echo(f"=== prompt {i}: {text_in}")
        for s, c in enumerate(group):
            cut = " [truncated]" if c.truncated else ""
            echo(f"--- sample {s} ({c.num_tokens} tokens{cut})")
            echo(c.text)
        out.append([c.text for c in group])
    echo(f"engine: {pool}")
    return out
