"""A Hugging Face tokenizer built from a GGUF header alone: no torch, no transformers GGUF code.

A GGUF carries its tokenizer as metadata (``tokenizer.ggml.*``: tokens, merges, token types,
special ids, the chat template). transformers can read it too, but its reader imports torch
(5.x), which meljax never needs at run time; so the same tokenizer is assembled here with
``tokenizers`` directly. It must encode exactly as transformers' (``tests/models``
checks that on a few hundred strings). Byte-level BPE (``tokenizer.ggml.model == "gpt2"``:
SmolLM, Llama 3, Qwen, ...) is supported; other kinds fail with one line naming the kind.
"""

from __future__ import annotations

import functools

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp token types (``tokenizer.ggml.token_type``)
CONTROL = 3  # special tokens such as <|im_end|>: matched whole, skipped when decoding
USER_DEFINED = 4  # added tokens such as <think>: matched whole, kept when decoding

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ``tokenizer.ggml.pre`` -> the split regex its merges were learned with; any other value uses
# GPT-2's byte-level split (what SmolLM's "smollm" and GPT-2's "default" mean).
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the spelling of every byte-level token)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tokenizer_metadata(reader) -> dict:
    """The ``tokenizer.*`` fields of a ``gguf.GGUFReader`` under short names."""
    return {
        "model": _field(reader, "tokenizer.ggml.model"),
        "pre": _field(reader, "tokenizer.ggml.pre"),
        "tokens": _field(reader, "tokenizer.ggml.tokens"),
        "token_type": _field(reader, "tokenizer.ggml.token_type") or [],
        "merges": _field(reader, "tokenizer.ggml.merges"),
        "bos_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "unk_id": _field(reader, "tokenizer.ggml.unknown_token_id"),
        "pad_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }


def _spell(token: str, alphabet: set[str], spelling: dict[int, str]) -> str:
    """A vocabulary entry in the byte alphabet (llama.cpp stores a few as raw text)."""
    if set(token) <= alphabet:
        return token
    return "".join(spelling[b] for b in token.encode("utf-8"))


def byte_level_bpe(meta: dict) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` of a byte-level BPE vocabulary (``model == "gpt2"``).

    Control tokens become special added tokens and user-defined ones plain added tokens, so
    both are matched whole; a control token spelled outside the byte alphabet is a llama.cpp
    mislabel and stays an ordinary vocabulary entry (as in transformers).
    """
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    tokens = list(meta["tokens"])
    vocab = {_spell(t, alphabet, spelling): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["merges"] or []]
    if not merges:
        raise ValueError("GGUF tokenizer: a byte-level BPE vocabulary without merges")
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="")
    )
    split = PRE_TOKENIZER_SPLITS.get(meta["pre"])
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    types = list(meta["token_type"])
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types, strict=False)
        if kind == CONTROL and set(t) <= alphabet
    ]
    tok.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == USER_DEFINED and t in vocab
    ]
    tok.add_tokens(user)
    return tok


def _special(meta: dict, key: str) -> str | None:
    i = meta[key]
    return None if i is None else meta["tokens"][int(i)]


def _post_processor(meta: dict) -> processors.TemplateProcessing:
    """BOS / EOS around each sequence as the GGUF's ``add_bos_token`` / ``add_eos_token`` say."""
    bos, eos = _special(meta, "bos_id"), _special(meta, "eos_id")
    add_bos, add_eos = meta["add_bos"] and bos is not None, meta["add_eos"] and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = (
        f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    )
    specials = [(bos, int(meta["bos_id"]))] if add_bos else []
    specials += [(eos, int(meta["eos_id"]))] if add_eos else []
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def tokenizer_from_gguf(reader):
    """A ``PreTrainedTokenizerFast`` equal to the one the GGUF describes (chat template too).

    Args:
      reader: a ``gguf.GGUFReader`` of the file.

    Raises:
      ValueError: the file has no tokenizer or one of a kind other than byte-level BPE.
    """
    from transformers import PreTrainedTokenizerFast

    meta = tokenizer_metadata(reader)
    if meta["tokens"] is None:
        raise ValueError("GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    if meta["model"] != "gpt2":
        raise ValueError(
            f"GGUF tokenizer kind {meta['model']!r} is not supported (only byte-level BPE, "
            f"'gpt2'); convert the original Hugging Face folder instead"
        )
    tok = byte_level_bpe(meta)
    tok.post_processor = _post_processor(meta)
    names = {"bos_token": "bos_id", "eos_token": "eos_id", "unk_token": "unk_id"}
    names["pad_token"] = "pad_id"
    specials = {k: _special(meta, v) for k, v in names.items() if meta[v] is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    if meta["chat_template"]:
        fast.chat_template = meta["chat_template"]
    return fast
