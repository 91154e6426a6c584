"""The model a plan compiles: from a ``config.json`` when there is one, else a built-in table
of the architectures the paper configs name, so a plan needs no weights and no download.

Point a plan at any Hugging Face architecture with ``--config.model.path=FOLDER`` (a folder
holding ``config.json``; the weights are not read) or ``--model_config=FILE.json``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from meljax.config.schema import from_section
from meljax.config.sections import ModelSettings, RandomModelSettings
from meljax.models.config import ModelConfig
from meljax.models.sources import DEMO_ALIASES

if TYPE_CHECKING:
    import ml_collections

# config.json values of the released checkpoints (huggingface.co/Qwen/Qwen3-*-Base,
# HuggingFaceTB/SmolLM2-135M-Instruct); only the fields meljax reads.
_QWEN3 = dict(
    model_type="qwen3",
    vocab_size=151936,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
    hidden_act="silu",
)
BUILTIN = {
    "qwen3-1.7b": dict(
        _QWEN3,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        _QWEN3,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        _QWEN3,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
    "qwen3-14b": dict(
        _QWEN3,
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=40,
        num_attention_heads=40,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        hidden_act="silu",
        tie_word_embeddings=True,
    ),
}


def builtin_name(path: str) -> str | None:
    """``~/models/Qwen3-8B-Base`` -> ``qwen3-8b`` when that architecture is built in."""
    base = os.path.basename(os.path.normpath(os.path.expanduser(path))).lower()
    if base in DEMO_ALIASES:
        return "smollm2-135m"
    for suffix in ("-base", "-instruct"):
        base = base.removesuffix(suffix)
    return base if base in BUILTIN else None


def resolve_model_config(
    cfg: ml_collections.ConfigDict, model_config: str | None = None
) -> tuple[ModelConfig, str]:
    """The run's ``ModelConfig`` (dtypes from ``cfg.model``) and where it came from."""
    from meljax.trainer import setup

    m = cfg.model
    dtypes = dict(dtype=m.dtype, param_dtype=m.param_dtype)
    if model_config:
        file = os.path.expanduser(model_config)
        if os.path.isdir(file):
            file = os.path.join(file, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"--model_config={model_config}: no such config.json")
        with open(file) as f:
            return ModelConfig.from_hf_dict(json.load(f), **dtypes), f"config.json at {file}"
    if m.random_init:
        from meljax.models import load_tokenizer
        from meljax.models.tokenizer import make_tiny_tokenizer

        tokenizer = load_tokenizer(m.tokenizer) if m.tokenizer else make_tiny_tokenizer()
        model = from_section(ModelSettings, "model", cfg)
        arch = setup.random_model_config(
            model, from_section(RandomModelSettings, "model.random", cfg), tokenizer
        )
        return arch, "model.random (random_init)"
    file = os.path.join(os.path.expanduser(m.path), "config.json")
    if os.path.isfile(file):
        with open(file) as f:
            return ModelConfig.from_hf_dict(json.load(f), **dtypes), f"config.json at {file}"
    name = builtin_name(m.path)
    if name is None:
        known = ", ".join(sorted(BUILTIN))
        raise FileNotFoundError(
            f"model.path={m.path!r} has no config.json and names no built-in architecture "
            f"({known}); point --config.model.path at a folder holding config.json (weights "
            f"are not needed) or pass --model_config=path/to/config.json"
        )
    return (
        ModelConfig.from_hf_dict(BUILTIN[name], **dtypes),
        f"built-in {name} architecture (no config.json at {m.path})",
    )
