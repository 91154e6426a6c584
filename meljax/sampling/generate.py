"""Text in, text out: a thin wrapper of ``Sampler`` for notebooks, the CLI and quick checks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
from flax import nnx

from meljax.sampling.sampler import Sampler, SamplingParams, format_bytes


def _ids(value: Any) -> list[int]:
    """An eos id field (``None``, an int or a list of ints) as a list."""
    if value is None:
        return []
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [int(v) for v in value]
    return [int(value)]


def stop_token_ids(tokenizer, config) -> list[int]:
    """EOS ids of the tokenizer followed by those of the model config, without duplicates."""
    ids = _ids(getattr(tokenizer, "eos_token_id", None)) + _ids(
        getattr(config, "eos_token_id", None)
    )
    return list(dict.fromkeys(ids))


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt.

    With ``chat`` and a tokenizer that has a chat template, each prompt becomes a single user
    message followed by the generation prompt. The template is rendered to text and tokenized
    without added special tokens, because templates carry their own BOS/role markers (for
    SmolLM2 this equals ``apply_chat_template(..., tokenize=True)``). Otherwise the plain text is
    tokenized with the tokenizer's default special tokens.
    """
    use_chat = chat and getattr(tokenizer, "chat_template", None)
    out = []
    for text in prompts:
        if use_chat:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            out.append(list(tokenizer(rendered, add_special_tokens=False)["input_ids"]))
        else:
            out.append(list(tokenizer(text)["input_ids"]))
    return out


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
    chat: bool = True,
) -> list[list[str]]:
    """Samples ``num_samples`` completions for each prompt string.

    Args:
      model: a meljax ``Transformer``.
      tokenizer: its Hugging Face tokenizer (``meljax.models.load_tokenizer``).
      prompts: prompt texts.
      num_samples, max_new_tokens, temperature, top_p, top_k: see ``SamplingParams``
        (``temperature=0`` is greedy).
      seed: PRNG seed; the same seed gives the same completions.
      chat: wrap each prompt as a user message of the chat template (when there is one).

    Returns:
      One list of ``num_samples`` completion strings per prompt, special tokens stripped.
      Generation stops at the tokenizer's or the config's EOS token(s).
    """
    if not prompts:
        return []
    graphdef, params = nnx.split(model)
    stops = stop_token_ids(tokenizer, model.cfg)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = stops[0] if stops else 0
    # The jitted core is cached on the graph definition, so a fresh Sampler per call is cheap.
    sampler = Sampler(graphdef, stop_token_ids=stops, pad_id=pad)
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_samples=num_samples,
    )
    result = sampler.sample(
        params, encode_prompts(tokenizer, prompts, chat), sampling, jax.random.key(seed)
    )
    texts = [
        tokenizer.decode(result.completion(r), skip_special_tokens=True) for r in range(len(result))
    ]
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def sample_model(
    model_path: str,
    prompts: Sequence[str],
    sampling: SamplingParams,
    *,
    seed: int = 0,
    dtype: str = "float32",
    cache_dtype: str | None = None,
    chat: bool = True,
    echo: Callable[[str], Any] = print,
) -> list[list[str]]:
    """The ``meljax sample`` command without its flags: load, sample, print, return the texts.

    Args:
      model_path: a Hugging Face folder, a ``.gguf`` file or ``demo``.
      prompts: prompt texts (at least one).
      sampling: the sampling controls.
      seed, dtype, cache_dtype, chat: PRNG seed, compute dtype, KV-cache dtype (``None``: the
        compute dtype), chat-template wrapping.
      echo: where the lines go (``print`` by default).

    Prints each completion (with its token count and a ``[truncated]`` mark) and the KV-cache
    memory estimate of the call; returns one list of completions per prompt.

    Raises:
      ValueError: no prompt or bad sampling controls; FileNotFoundError: no such model.
    """
    from meljax.models import from_pretrained, load_tokenizer, resolve_model_path

    if not prompts:
        raise ValueError("give at least one --prompt")
    sampling.validate()
    looks_like_path = os.sep in model_path or model_path.endswith(".gguf")
    if looks_like_path and not os.path.exists(model_path):
        raise FileNotFoundError(f"--model: not found: {model_path}")
    path = resolve_model_path(model_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--model: model folder not found: {path} (expected a Hugging Face folder with "
            f"config.json, a .gguf file, or 'demo')"
        )
    model = from_pretrained(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    graphdef, params = nnx.split(model)
    stops = stop_token_ids(tokenizer, model.cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    sampler = Sampler(graphdef, stop_token_ids=stops, pad_id=pad, cache_dtype=cache_dtype)
    prompt_ids = encode_prompts(tokenizer, prompts, chat=chat)
    mem = sampler.memory_estimate(len(prompt_ids), max(len(p) for p in prompt_ids), sampling)
    result = sampler.sample(params, prompt_ids, sampling, jax.random.key(seed))

    g = sampling.num_samples
    out: list[list[str]] = []
    for i, prompt in enumerate(prompts):
        echo(f"=== prompt {i}: {prompt}")
        texts = []
        for s in range(g):
            row = i * g + s
            text = tokenizer.decode(result.completion(row), skip_special_tokens=True)
            texts.append(text)
            cut = " [truncated]" if result.truncated[row] else ""
            echo(f"--- sample {s} ({int(result.lengths[row])} tokens{cut})")
            echo(text)
        out.append(texts)
    kv_dtype = sampler.cache_dtype.__name__ if sampler.cache_dtype else dtype
    echo(
        f"KV cache: {format_bytes(mem['kv_cache_bytes'])} for {mem['rows']} rows x "
        f"{mem['cache_len']} slots (prompt bucket {mem['prompt_len']} + {mem['new_tokens']} new, "
        f"{kv_dtype}); sampling buffers in total {format_bytes(mem['total_bytes'])}"
    )
    return out
