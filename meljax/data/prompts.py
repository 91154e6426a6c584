"""Prompt formatting: question -> model input text; the prompt-length rule.

Two templates:

* ``"chat"`` (instruction-tuned models): one user turn ``"{question}\\n{instruction}"``
  (after an optional system turn) rendered by the tokenizer's own chat template with
  ``add_generation_prompt=True``, so the text ends where the assistant's reply begins.
* ``"raw"`` (base models): a plain string template, by default
  ``"Question: {question}\\n{instruction}\\nAnswer:"``.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterable
from typing import Any, Literal

from meljax.config.schema import option, validate_fields

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_RAW_TEMPLATE",
    "DEMO_INSTRUCTION",
    "cut_prompt",
    "format_prompt",
    "format_prompts",
    "prompt_limit",
]

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Asks for step-by-step reasoning and a ``\\boxed{}`` final answer (Qwen2.5-Math style)."""

DEMO_INSTRUCTION = "Answer with a number."
"""Short instruction for the CPU arithmetic demo, where replies should be one number."""

DEFAULT_RAW_TEMPLATE = "Question: {question}\n{instruction}\nAnswer:"
"""Template for base models; fields ``{question}`` and ``{instruction}``."""

Template = Literal["chat", "raw"]

_RAW_FIELDS = {"question", "instruction"}


def _user_message(question: str, instruction: str) -> str:
    question = question.strip()
    instruction = instruction.strip()
    return f"{question}\n{instruction}" if instruction else question


def _check_raw_template(raw_template: str) -> None:
    try:
        names = {
            name for _, name, _, _ in string.Formatter().parse(raw_template) if name is not None
        }
    except ValueError as e:
        raise ValueError(
            f"raw_template {raw_template!r} is not a valid format string: {e}"
        ) from None
    unknown = names - _RAW_FIELDS
    if unknown:
        raise ValueError(
            f"raw_template {raw_template!r} uses unknown fields {sorted(unknown)}; "
            f"allowed: {{question}}, {{instruction}} (write literal braces as '{{{{' '}}}}')"
        )
    if "question" not in names:
        raise ValueError(f"raw_template {raw_template!r} has no {{question}} field")


def format_prompt(
    question: str,
    *,
    tokenizer: Any = None,
    template: Template = "chat",
    instruction: str = DEFAULT_INSTRUCTION,
    system_prompt: str | None = None,
    raw_template: str = DEFAULT_RAW_TEMPLATE,
) -> str:
    """Formats one question as model input text.

    Args:
      question: the bare problem text.
      tokenizer: a ``transformers`` tokenizer with a ``chat_template`` (chat mode only).
      template: ``"chat"`` or ``"raw"``.
      instruction: answering instruction appended to the question; ``""`` for none.
      system_prompt: optional system turn (chat mode); in raw mode it is prepended as a
        first paragraph.
      raw_template: format string for raw mode, with ``{question}`` and optionally
        ``{instruction}``. With an empty instruction, the template's ``{instruction}``
        line is removed rather than left blank.

    Returns:
      The prompt text; in chat mode it ends with the assistant-turn header.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template='chat' needs a tokenizer (or use template='raw')")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{type(tokenizer).__name__} has no chat_template; use template='raw' for "
                f"base models or set tokenizer.chat_template"
            )
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": _user_message(question, instruction)})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, not str")
        return text
    if template == "raw":
        _check_raw_template(raw_template)
        instruction = instruction.strip()
        if not instruction:
            # Drop the instruction's own line so no blank line is left behind.
            raw_template = raw_template.replace("{instruction}\n", "").replace(
                "\n{instruction}", ""
            )
        text = raw_template.format(question=question.strip(), instruction=instruction)
        if system_prompt:
            text = f"{system_prompt.strip()}\n\n{text}"
        return text
    raise ValueError(f"template must be 'chat' or 'raw', got {template!r}")


def format_prompts(questions: Iterable[str], **kwargs: Any) -> list[str]:
    """:func:`format_prompt` applied to each question (same keyword arguments)."""
    return [format_prompt(q, **kwargs) for q in questions]


def prompt_limit(
    max_prompt_tokens: int, context_len: int | None, max_new_tokens: int
) -> int | None:
    """THE prompt-length rule of training, evaluation and sampling: the most tokens a prompt
    keeps, the smaller of ``max_prompt_tokens`` (0: no limit) and the model's context less
    the answer budget (``context_len - max_new_tokens``; ``None``: no context known).

    Why: a prompt past the context makes the model read positions it was never trained on,
    and a huge one (a 200,000-character question) stalls prefill for many minutes.

    Raises:
      ValueError: ``max_new_tokens`` leaves no room for a prompt in the context.
    """
    limits = [max_prompt_tokens] if max_prompt_tokens else []
    if context_len is not None:
        room = context_len - max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                f"context of {context_len} tokens (max_position_embeddings)"
            )
        limits.append(room)
    return min(limits) if limits else None


def cut_prompt(ids: list[int], limit: int, bos: int | None) -> list[int]:
    """The last ``limit`` tokens of ``ids``, its leading BOS (when ``bos``) kept in front:
    the end of a question, which asks it, is what the model must see."""
    keep_bos = bos is not None and bool(ids) and ids[0] == bos and limit > 1
    return ([ids[0]] if keep_bos else []) + ids[len(ids) - limit + int(keep_bos) :]


INSTRUCTIONS = {"default": DEFAULT_INSTRUCTION, "demo": DEMO_INSTRUCTION, "none": ""}


def resolve_instruction(value: str) -> str:
    """``default`` / ``demo`` / ``none`` -> the instruction text; anything else is literal."""
    return INSTRUCTIONS.get(value, value)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How a question becomes model input, and when a completion ends (config section ``data``)."""

    prompt_template: str = option(
        "chat", "chat (tokenizer's chat template) | raw (base models)", choices=("chat", "raw")
    )
    raw_template: str = option(
        DEFAULT_RAW_TEMPLATE, "raw prompts: a format string with {question} and {instruction}"
    )
    instruction: str = option(
        "default", '"default" (step by step, \\boxed{}), "demo", "none", or literal text'
    )
    system_prompt: str = option("", "optional system message (chat) or first paragraph (raw)")
    max_prompt_tokens: int = option(
        512,
        "longer question prompts are cut from the left, BOS kept, counted (data/prompts_cut); "
        "0 = only the model's context less max_new_tokens, which always applies",
        minimum=0,
    )
    bos: str = option(
        "auto",
        "BOS token: auto (chat: as the template writes it; raw: as the tokenizer adds it) "
        "| always | never",
        choices=("auto", "always", "never"),
    )
    stop_strings: tuple = option(
        (), "completions end at the first of these strings, e.g. ('\\nQuestion:',) for raw"
    )

    def __post_init__(self):
        validate_fields(self)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")

    @classmethod
    def plain(cls, chat: bool = True, **kw: Any) -> PromptConfig:
        """The prompt as given: one user turn (``chat``) or the bare text, no instruction."""
        return cls(
            prompt_template="chat" if chat else "raw",
            raw_template="{question}",
            instruction="none",
            max_prompt_tokens=0,
            **kw,
        )
