"""Decoder-only models (Llama / SmolLM2 / Qwen2 / Qwen3) and their checkpoint I/O."""

from meljax.models.checkpoint_io import (
    abstract_model,
    build_model,
    from_pretrained,
    iter_hf_weights,
    save_pretrained,
    weight_specs,
)
from meljax.models.config import ModelConfig, resolve_dtype
from meljax.models.gguf_import import convert_gguf, demo_gguf_path, demo_model_dir
from meljax.models.kv_cache import Cache, cache_bytes, init_cache, split_cache, stack_cache
from meljax.models.tokenizer import load_tokenizer, resolve_model_path
from meljax.models.transformer import Transformer, default_positions, prefer_split_layers

__all__ = [
    "Cache",
    "ModelConfig",
    "Transformer",
    "abstract_model",
    "build_model",
    "cache_bytes",
    "convert_gguf",
    "default_positions",
    "demo_gguf_path",
    "demo_model_dir",
    "from_pretrained",
    "init_cache",
    "iter_hf_weights",
    "load_tokenizer",
    "prefer_split_layers",
    "resolve_dtype",
    "resolve_model_path",
    "save_pretrained",
    "split_cache",
    "stack_cache",
    "weight_specs",
]
