"""Hugging Face checkpoint I/O: ``from_pretrained`` / ``save_pretrained`` without torch.

Each JAX weight is paired with its Hugging Face tensor name and a pair of layout conversions
(HF ``[out, in]`` <-> ours ``[in, heads, head_dim]`` ...). Loading onto a mesh builds every weight
with ``jax.make_array_from_callback`` so each device only receives its own shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from meljax import sharding as shd
from meljax.models import safetensors_io
from meljax.models.config import ModelConfig, resolve_dtype
from meljax.models.transformer import Transformer

Path = tuple  # an nnx state path such as ("layers", 0, "attn", "q_proj")


@dataclass(frozen=True)
class WeightSpec:
    path: Path
    hf_name: str
    from_hf: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Every weight of the model, with its Hugging Face name and layout conversions."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj_in(heads):  # HF [heads*hd, d] <-> ours [d, heads, hd]
        return (
            lambda w: w.T.reshape(d, heads, hd),
            lambda w: w.reshape(d, heads * hd).T,
        )

    def bias(heads):  # HF [heads*hd] <-> ours [heads, hd]
        return (lambda b: b.reshape(heads, hd), lambda b: b.reshape(heads * hd))

    specs = [
        WeightSpec(("embed",), "model.embed_tokens.weight", np.asarray, np.asarray),
        WeightSpec(("final_norm",), "model.norm.weight", np.asarray, np.asarray),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec(("lm_head",), "lm_head.weight", _t, _t))
    for i in range(cfg.num_layers):
        p, n = ("layers", i), f"model.layers.{i}."
        specs += [
            WeightSpec(p + ("input_norm",), n + "input_layernorm.weight", np.asarray, np.asarray),
            WeightSpec(
                p + ("post_attn_norm",),
                n + "post_attention_layernorm.weight",
                np.asarray,
                np.asarray,
            ),
            WeightSpec(p + ("attn", "q_proj"), n + "self_attn.q_proj.weight", *proj_in(h)),
            WeightSpec(p + ("attn", "k_proj"), n + "self_attn.k_proj.weight", *proj_in(kv)),
            WeightSpec(p + ("attn", "v_proj"), n + "self_attn.v_proj.weight", *proj_in(kv)),
            WeightSpec(
                p + ("attn", "o_proj"),
                n + "self_attn.o_proj.weight",
                lambda w: w.T.reshape(h, hd, d),
                lambda w: w.reshape(h * hd, d).T,
            ),
            WeightSpec(p + ("mlp", "gate_proj"), n + "mlp.gate_proj.weight", _t, _t),
            WeightSpec(p + ("mlp", "up_proj"), n + "mlp.up_proj.weight", _t, _t),
            WeightSpec(p + ("mlp", "down_proj"), n + "mlp.down_proj.weight", _t, _t),
        ]
        if cfg.attention_bias:
            for name, heads in (("q", h), ("k", kv), ("v", kv)):
                specs.append(
                    WeightSpec(
                        p + ("attn", f"{name}_bias"),
                        n + f"self_attn.{name}_proj.bias",
                        *bias(heads),
                    )
                )
        if cfg.qk_norm:
            for name in ("q", "k"):
                specs.append(
                    WeightSpec(
                        p + ("attn", f"{name}_norm"),
                        n + f"self_attn.{name}_norm.weight",
                        np.asarray,
                        np.asarray,
                    )
                )
    return specs


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract (shape-only) state of a model, allocating nothing."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def place(host: np.ndarray, dtype, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Puts a host array on device(s); with a sharding, each device gets only its shard."""
    if sharding is None:
        return jnp.asarray(host, dtype=dtype)
    np_dtype = np.dtype(dtype)
    return jax.make_array_from_callback(
        host.shape, sharding, lambda idx: np.asarray(host[idx], dtype=np_dtype)
    )


def build_model(
    cfg: ModelConfig,
    get_weight: Callable[[WeightSpec, tuple[int, ...]], np.ndarray],
    *,
    mesh: Mesh | None = None,
    rules=None,
) -> Transformer:
    """Assembles a model from host weights given by ``get_weight(spec, expected_shape)``."""
    graphdef, abstract = abstract_model(cfg)
    flat = dict(nnx.to_flat_state(abstract))
    shardings = dict(nnx.to_flat_state(shd.param_shardings(abstract, mesh, rules))) if mesh else {}
    specs = weight_specs(cfg)
    expected = {s.path for s in specs}
    if expected != set(flat):
        raise AssertionError(f"weight table out of sync with model: {expected ^ set(flat)}")
    for spec in specs:
        var = flat[spec.path]
        host = get_weight(spec, var.shape)
        if host.shape != var.shape:
            raise ValueError(
                f"weight {spec.hf_name}: shape {host.shape} after conversion, model expects "
                f"{var.shape}"
            )
        sharding = shardings.get(spec.path)
        if isinstance(sharding, nnx.Variable):
            sharding = sharding.get_value()
        var.set_value(place(host, cfg.param_dtype, sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(
    path: str,
    *,
    dtype="float32",
    param_dtype=None,
    mesh: Mesh | None = None,
    rules=None,
) -> Transformer:
    """Loads a Hugging Face model folder (``config.json`` + safetensors) without torch.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` or a sharded index.
      dtype: compute dtype (``"float32"``, ``"bfloat16"``).
      param_dtype: storage dtype of the weights (default: ``dtype``).
      mesh: when given, every weight is created sharded over it by its logical axes.

    Raises:
      FileNotFoundError: the folder, ``config.json`` or weight files are missing.
      ValueError: unsupported ``model_type``; a missing weight or one of the wrong shape (its
        name and both shapes are in the message).
    """
    path = os.path.expanduser(path)
    cfg = ModelConfig.from_pretrained(path, dtype=dtype, param_dtype=param_dtype)
    folder = safetensors_io.SafetensorsFolder(path)

    def get(spec: WeightSpec, shape) -> np.ndarray:
        name = spec.hf_name
        if name not in folder:
            hint = " (config says untied embeddings)" if name == "lm_head.weight" else ""
            raise ValueError(f"{path}: missing weight {name}{hint}")
        raw = folder.get(name)
        expected_hf = spec.to_hf(np.empty(shape, np.int8)).shape
        if raw.shape != expected_hf:
            raise ValueError(
                f"{path}: weight {name} has shape {raw.shape}, config.json implies {expected_hf}"
            )
        return spec.from_hf(raw)

    return build_model(cfg, get, mesh=mesh, rules=rules)


def iter_hf_weights(model: Transformer, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, host array)`` for every weight, gathering shards across hosts."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    np_dtype = np.dtype(resolve_dtype(dtype)) if dtype is not None else None
    for spec in weight_specs(model.cfg):
        value = flat[spec.path].get_value()
        if not value.is_fully_addressable:
            from jax.experimental import multihost_utils

            value = multihost_utils.process_allgather(value, tiled=True)
        host = np.asarray(jax.device_get(value))
        if np_dtype is not None:
            host = host.astype(np_dtype)
        yield spec.hf_name, np.ascontiguousarray(spec.to_hf(host))


def save_pretrained(
    model: Transformer,
    path: str,
    *,
    tokenizer=None,
    dtype=None,
    max_shard_bytes: int = 4 << 30,
) -> str:
    """Writes a Hugging Face folder that ``transformers.AutoModelForCausalLM`` loads.

    Only process 0 writes on multi-host runs (all processes must call it: gathering is
    collective). ``dtype`` converts the stored weights (default: as held).
    """
    cfg = model.cfg
    weights = list(iter_hf_weights(model, dtype))
    if jax.process_index() != 0:
        return path
    os.makedirs(path, exist_ok=True)
    stored = cfg
    if dtype is not None:
        stored = cfg.replace(param_dtype=resolve_dtype(dtype))
    safetensors_io.write_folder(path, weights, max_shard_bytes=max_shard_bytes)
    hf = stored.to_hf_dict()
    if weights and weights[0][1].dtype == np.dtype(ml_dtypes.bfloat16):
        hf["torch_dtype"] = "bfloat16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
