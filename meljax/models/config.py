"""Model configuration, built from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
REMAT_POLICIES = ("auto", "none", "full", "dots", "dots_no_batch")

_DTYPES = {
    "float32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "f16": jnp.float16,
}


def resolve_dtype(dtype: Any) -> Any:
    """Accepts ``"bf16"``, ``"float32"``, ``jnp.bfloat16`` ...; returns a jnp dtype."""
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}") from None
    return jnp.dtype(dtype).type if dtype is not None else jnp.float32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters (Llama / Qwen2 / Qwen3 family).

    Attributes:
      model_type: ``llama`` (also SmolLM2, Mistral without sliding window), ``qwen2``, ``qwen3``.
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim:
        the usual sizes; ``head_dim`` may differ from ``hidden_size // num_heads`` (Qwen3).
      rope_theta: RoPE base frequency.
      rope_scaling: ``None`` or a dict with ``rope_type`` (``"llama3"`` or ``"linear"``) and its
        parameters, as in Hugging Face configs.
      attention_bias: q/k/v projections have a bias (Qwen2).
      qk_norm: RMSNorm over ``head_dim`` on queries and keys before RoPE (Qwen3).
      tie_word_embeddings: the output projection is the transposed input embedding.
      dtype: compute dtype of activations; param_dtype: storage dtype of weights.
      scan_layers: run the (stacked) layers under ``jax.lax.scan`` (one compiled layer: fast
        compiles for deep models) instead of an unrolled loop; same results.
      remat_policy: what the backward pass of the cache-free forward recomputes per layer:
        ``none``, ``full`` (the whole layer; memory grows with one layer's activations),
        ``dots`` / ``dots_no_batch`` (keep matmul outputs), ``auto`` (full on TPU/GPU, the
        measured fastest on CPU; see ``transformer.resolve_remat``).
      attention_impl: ``auto``, ``xla``, ``chunked``, ``splash`` (TPU) or ``cudnn`` (GPU); see
        ``meljax.models.attention``.
      attention_block_size: query / key block of the ``chunked`` attention (tokens).
      prefill_chunk_size: prompts longer than this are written into the KV cache in chunks of
        this many tokens (``Transformer.prefill``); 0 disables chunking.
    """

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "auto"
    attention_impl: str = "auto"
    attention_block_size: int = 512
    prefill_chunk_size: int = 2048

    def __post_init__(self):
        from meljax.models.attention import IMPLS

        if self.attention_impl not in IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.attention_block_size < 1 or self.prefill_chunk_size < 0:
            raise ValueError(
                f"attention_block_size={self.attention_block_size} must be >= 1 and "
                f"prefill_chunk_size={self.prefill_chunk_size} >= 0"
            )
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, h, kv, hd, f = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
        )
        attn = d * h * hd * 2 + d * kv * hd * 2
        if self.attention_bias:
            attn += (h + 2 * kv) * hd
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    @classmethod
    def from_hf_dict(
        cls, cfg: dict, *, dtype=jnp.float32, param_dtype=None, **overrides
    ) -> ModelConfig:
        """Builds the config from a parsed Hugging Face ``config.json`` (transformers 4.x or 5.x).

        ``overrides`` set fields that ``config.json`` does not hold (``scan_layers``,
        ``remat_policy``, ``attention_impl`` ...)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; "
                f"supported: {SUPPORTED_MODEL_TYPES}"
            )
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported (use_sliding_window=true)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r}; only 'silu'")
        heads = cfg["num_attention_heads"]
        # transformers 5 stores RoPE settings in ``rope_parameters``; 4.x in rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = rope or cfg.get("rope_scaling") or None
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind not in ("llama3", "linear"):
                raise ValueError(f"unsupported rope scaling type {kind!r}")
            else:
                scaling["rope_type"] = kind
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            attention_bias=True if model_type == "qwen2" else bool(cfg.get("attention_bias")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            dtype=resolve_dtype(dtype),
            param_dtype=resolve_dtype(param_dtype if param_dtype is not None else dtype),
            **overrides,
        )

    @classmethod
    def from_pretrained(cls, path: str, **kw) -> ModelConfig:
        path = os.path.expanduser(path)
        file = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder not found: {path}")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json in model folder {path}")
        with open(file) as f:
            return cls.from_hf_dict(json.load(f), **kw)

    def to_hf_dict(self) -> dict:
        """The ``config.json`` that transformers reads back (4.x and 5.x keys both written)."""
        arch = {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }
        arch["mistral"] = "MistralForCausalLM"
        out = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"}
            | dict(self.rope_scaling or {}),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "bfloat16" if self.param_dtype == jnp.bfloat16 else "float32",
            "use_cache": True,
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        return out
