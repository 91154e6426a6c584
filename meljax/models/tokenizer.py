"""Tokenizer loading (``transformers.AutoTokenizer`` from a local folder) and model paths."""

from __future__ import annotations

import os

from meljax.models import sources

DEMO_ALIASES = sources.DEMO_ALIASES


def resolve_model_path(path: str) -> str:
    """A local Hugging Face folder for ``path``: see :func:`meljax.models.sources.resolve`
    (``demo``, a folder, a ``.gguf`` file, ``gs://...``, a hub id ``org/name[@rev]``)."""
    return sources.resolve(path)


def load_tokenizer(path: str):
    """``AutoTokenizer`` from a local folder; left padding, pad token defaulting to EOS."""
    from transformers import AutoTokenizer

    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer():
    """A character-level tokenizer with a chat template, built locally (no files, no hub).

    Used with randomly initialised tiny models (tests, smoke runs, the tiny config). Special
    tokens: ``<pad>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2 (also EOS), ``<unk>`` 3.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast
