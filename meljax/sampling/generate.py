"""Text in, text out through :class:`meljax.sampling.policy.Policy`: notebooks, ``meljax sample``, checks."""

from __future__ import annotations

import dataclasses
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
      prompt: a :class:`meljax.data.prompts.PromptConfig` (e.g. a training run's ``data`` settings),
        so the prompts, BOS and stops are exactly those of training.
      max_slots: most decode slots (0: one per sample; fewer bound the KV cache, and the
        samples that do not fit wait for free slots).

    Returns:
      One list of ``num_samples`` completion texts per prompt (special tokens stripped, cut
      before any stop string). Generation stops at the policy's stop tokens.
    """
    from meljax.data.prompts import PromptConfig
    from meljax.sampling.policy import Policy

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
    sampling = SamplingParams(max_new_tokens, temperature, top_p, top_k, num_samples)
    ids = [policy.encode(p, max_new_tokens) for p in prompts]  # cut once, by the one rule
    out = policy.generate(policy.prepare(params), ids, sampling, jax.random.key(seed))
    return [[c.text for c in group] for group in out]


def sample_model(
    cfg: Any,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    echo: Callable[[str], Any] = print,
) -> list[list[str]]:
    """The ``meljax sample`` command without its flags: load, sample, print, return the texts.

    Args:
      cfg: a config (``ConfigDict``: :func:`meljax.config.settings.base_config` or a config
        file's, e.g. ``configs/demo.py``), as for training: the model (``model``, loaded
        with :func:`meljax.trainer.setup.build_model_and_tokenizer`), how a prompt is rendered
        (``data``), the sampling controls and the engine (``rollout``: max_new_tokens,
        temperature (0 = greedy), top_p, top_k, cache_dtype, max_slots, ...), ``mesh`` and the
        PRNG ``seed``. The policy is the run's (:func:`meljax.trainer.setup.build_policy`).
      prompts: prompt texts (at least one), rendered as training renders a question.
      num_samples: completions per prompt.
      echo: where the lines go (``print`` by default).

    Prints each completion (with its token count and a ``[truncated]`` mark) and the engine's
    slot pool of the call (slots, cache length, KV memory); returns one list of completions
    per prompt.

    Raises:
      ValueError: no prompt or a bad config value; FileNotFoundError: no such model.
    """
    # function-local: meljax.trainer and meljax.config import meljax.sampling
    from meljax.config.settings import validate
    from meljax.trainer import setup

    if not prompts:
        raise ValueError("give at least one --prompt")
    s = validate(cfg, jax.device_count())  # the typed settings, once: one line per bad value
    sampling = dataclasses.replace(s.rollout.sampling(), num_samples=num_samples)
    sampling.validate()
    mesh = setup.build_mesh(s.mesh)
    model, tokenizer = setup.build_model_and_tokenizer(s.model, s.random, s.run.seed, mesh=mesh)
    graphdef, params = nnx.split(model)
    policy = setup.build_policy(s, graphdef, tokenizer, mesh)
    prompt_ids = [policy.encode(p, sampling.max_new_tokens) for p in prompts]
    pool = policy.engine.describe(
        len(prompt_ids) * sampling.num_samples,
        max(len(p) for p in prompt_ids),
        sampling.max_new_tokens,
    )
    result = policy.generate(
        policy.prepare(params), prompt_ids, sampling, jax.random.key(s.run.seed)
    )

    out: list[list[str]] = []
    for i, (text_in, group) in enumerate(zip(prompts, result, strict=True)):
        echo(f"=== prompt {i}: {text_in}")
        for j, c in enumerate(group):
            cut = " [truncated]" if c.truncated else ""
            echo(f"--- sample {j} ({c.num_tokens} tokens{cut})")
            echo(c.text)
        out.append([c.text for c in group])
    echo(f"engine: {pool}")
    return out
