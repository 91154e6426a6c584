"""The GGUF tokenizer meljax builds itself against the one transformers builds (with torch)."""

import os
import random

import pytest

from meljax.models import demo_gguf_path, load_tokenizer
from meljax.models.gguf_tokenizer import byte_alphabet, tokenizer_from_gguf

WORDS = [
    "What",
    "is",
    "14",
    "plus",
    "7",
    "?",
    "Answer",
    "with",
    "a",
    "number.",
    "The",
    "answer",
    "is",
    "\\boxed{21}",
    "$x^2 + y^2 = z^2$",
    "don't",
    "I'll",
    "WE'RE",
    "it's",
    "naïve",
    "café",
    "Ærø",
    "straße",
    "日本語",
    "中文字符",
    "한국어",
    "Привет",
    "مرحبا",
    "שלום",
    "ελληνικά",
    "🙂",
    "👩‍💻",
    "🇫🇷",
    "∑_{i=1}^{n}",
    "→",
    "≤",
    "½",
    "1,234,567",
    "3.14159",
    "0x1F",
    "-42",
    "def f(x):",
    "return x*2",
    "{'a': [1, 2]}",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<repo_name>",
    "http://example.com/a?b=c",
    "C++",
    "e.g.",
    "...",
    "!!!",
    "\u00a0",
    "\u200b",
]
SPACES = [" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n ", "   ", "\r\n", ""]


def _strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 12)
        out.append("".join(rng.choice(WORDS) + rng.choice(SPACES) for _ in range(k)))
    out += ["", " ", "\n", "  leading", "trailing  ", "\x00\x01\x7f", "a" * 300, "1" * 40]
    return out


def _chats(n: int, seed: int = 1) -> list[list[dict]]:
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        msgs = [{"role": "system", "content": rng.choice(WORDS)}] if i % 3 == 0 else []
        for j in range(rng.randint(1, 4)):
            role = "user" if j % 2 == 0 else "assistant"
            msgs.append({"role": role, "content": " ".join(rng.sample(WORDS, 5))})
        chats.append(msgs)
    return chats


def test_byte_alphabet_is_gpt2s_bijection():
    spelling = byte_alphabet()
    assert sorted(spelling) == list(range(256))
    assert len(set(spelling.values())) == 256
    assert spelling[ord("A")] == "A" and spelling[ord(" ")] == "Ġ" and spelling[ord("\n")] == "Ċ"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(ours as saved and reloaded, transformers' reference built with gguf_file=)."""
    pytest.importorskip("torch")  # transformers' GGUF reader needs it; meljax's does not
    import gguf
    from transformers import AutoTokenizer

    path = demo_gguf_path()
    folder = tmp_path_factory.mktemp("gguf_tok")
    tokenizer_from_gguf(gguf.GGUFReader(path)).save_pretrained(folder)
    ours = load_tokenizer(str(folder))
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return ours, ref


def test_specials_and_template_match_the_reference(tokenizers):
    ours, ref = tokenizers
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.chat_template == ref.chat_template
    assert len(ours) == len(ref)
    assert ours.all_special_ids == ref.all_special_ids


def test_encodes_and_decodes_like_the_reference(tokenizers):
    ours, ref = tokenizers
    strings = _strings(300)
    for s in strings:
        ids = ref(s)["input_ids"]
        assert ours(s)["input_ids"] == ids, repr(s)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            ), repr(s)
    assert ours(strings)["input_ids"] == ref(strings)["input_ids"]  # batched


def test_chat_formatted_text_matches_the_reference(tokenizers):
    ours, ref = tokenizers
    for msgs in _chats(60):
        for gen in (False, True):
            text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == text
            assert (
                ours(text, add_special_tokens=False)["input_ids"]
                == ref(text, add_special_tokens=False)["input_ids"]
            )


def test_conversion_does_not_import_torch(tmp_path):
    """The demo's path: converting the GGUF must work where torch is not installed."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import gguf\n"
        "from meljax.models import demo_gguf_path\n"
        "from meljax.models.gguf_tokenizer import tokenizer_from_gguf\n"
        f"tokenizer_from_gguf(gguf.GGUFReader(demo_gguf_path())).save_pretrained({str(tmp_path)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "tokenizer.json").exists()


def test_unsupported_kind_names_it():
    class Field:
        def __init__(self, v):
            self.v = v

        def contents(self):
            return self.v

    class Reader:
        fields = {"tokenizer.ggml.model": Field("llama"), "tokenizer.ggml.tokens": Field(["a"])}

    with pytest.raises(ValueError, match="'llama' is not supported"):
        tokenizer_from_gguf(Reader())
