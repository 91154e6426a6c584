"""Hugging Face checkpoint I/O: ``from_pretrained`` / ``save_pretrained`` without torch.

Each JAX weight is paired with its Hugging Face tensor name and a pair of layout conversions
(HF ``[out, in]`` <-> ours ``[in, heads, head_dim]`` ...). Per-layer tensors
(``model.layers.{i}.*``) become slices ``[i]`` of the stacked ``[num_layers, ...]`` parameters.
Loading onto a mesh builds every weight with ``jax.make_array_from_callback``: each device's
shard is assembled from its slice of each layer's tensor (read through ``np.memmap``, so only
those bytes are touched), and each device only receives its own shard.
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

from meljax.models import output_folder, safetensors_io
from meljax.models.config import ModelConfig, resolve_dtype
from meljax.models.layers import layer_weights
from meljax.models.transformer import Transformer
from meljax.runtime import sharding as shd

Path = tuple  # an nnx state path such as ("layers", "attn", "q_proj")


@dataclass(frozen=True)
class WeightSpec:
    """One Hugging Face tensor: where it lives in the model and how its layout converts.

    ``layer`` is the index along the leading ``[num_layers]`` axis of the stacked parameter at
    ``path`` (``None`` for the embedding, final norm and LM head).
    """

    path: Path
    hf_name: str
    from_hf: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layer: int | None = None


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


_HF_LAYER_NAMES = {
    "input_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}


def _layer_conversions(cfg: ModelConfig) -> dict[str, tuple[Callable, Callable]]:
    """Per-layer weight name -> (HF -> ours, ours -> HF) for one layer's slice."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj_in(heads):  # HF [heads*hd, d] <-> ours [d, heads, hd]
        return (lambda w: w.T.reshape(d, heads, hd), lambda w: w.reshape(d, heads * hd).T)

    def bias(heads):  # HF [heads*hd] <-> ours [heads, hd]
        return (lambda b: b.reshape(heads, hd), lambda b: b.reshape(heads * hd))

    same = (np.asarray, np.asarray)
    return {
        "input_norm": same,
        "post_attn_norm": same,
        "q_norm": same,
        "k_norm": same,
        "q_proj": proj_in(h),
        "k_proj": proj_in(kv),
        "v_proj": proj_in(kv),
        "o_proj": (lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T),
        "q_bias": bias(h),
        "k_bias": bias(kv),
        "v_bias": bias(kv),
        "gate_proj": (_t, _t),
        "up_proj": (_t, _t),
        "down_proj": (_t, _t),
    }


def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Every Hugging Face tensor of the model, with its place and layout conversions."""
    specs = [
        WeightSpec(("embed",), "model.embed_tokens.weight", np.asarray, np.asarray),
        WeightSpec(("final_norm",), "model.norm.weight", np.asarray, np.asarray),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec(("lm_head",), "lm_head.weight", _t, _t))
    conv = _layer_conversions(cfg)
    for name, info in layer_weights(cfg).items():
        path = ("layers", info.group, name) if info.group else ("layers", name)
        for i in range(cfg.num_layers):
            hf = f"model.layers.{i}.{_HF_LAYER_NAMES[name]}"
            specs.append(WeightSpec(path, hf, *conv[name], layer=i))
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


def _place_stacked(layers: list[Callable[[], np.ndarray]], shape, dtype, sharding) -> jax.Array:
    """A ``[L, ...]`` parameter from per-layer host getters; with a sharding, every shard is
    assembled from the layers it covers, each cut to the shard before conversion to ``dtype``."""
    np_dtype = np.dtype(dtype)

    def shard(idx) -> np.ndarray:
        rows = range(len(layers))[idx[0]]
        return np.stack([np.asarray(layers[i]()[idx[1:]], dtype=np_dtype) for i in rows])

    if sharding is None:
        return jnp.asarray(shard((slice(None),) * len(shape)))
    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def build_model(
    cfg: ModelConfig,
    get_weight: Callable[[WeightSpec, tuple[int, ...]], np.ndarray],
    *,
    mesh: Mesh | None = None,
    rules=None,
) -> Transformer:
    """Assembles a model from host weights given by ``get_weight(spec, expected_shape)``
    (``expected_shape`` is one layer's shape for a per-layer tensor). Every tensor is fetched
    and shape-checked once up front; with a mesh, each device's shard is then cut from it."""
    graphdef, abstract = abstract_model(cfg)
    flat = dict(nnx.to_flat_state(abstract))
    shardings = dict(nnx.to_flat_state(shd.param_shardings(abstract, mesh, rules))) if mesh else {}
    specs = weight_specs(cfg)
    expected = {s.path for s in specs}
    if expected != set(flat):
        raise AssertionError(f"weight table out of sync with model: {expected ^ set(flat)}")
    by_path: dict[Path, list[WeightSpec]] = {}
    for spec in specs:
        by_path.setdefault(spec.path, []).append(spec)
    for path, group in by_path.items():
        var = flat[path]
        stacked = group[0].layer is not None
        shape = var.shape[1:] if stacked else var.shape
        hosts = []
        for spec in group:
            host = get_weight(spec, shape)
            if host.shape != tuple(shape):
                raise ValueError(
                    f"weight {spec.hf_name}: shape {host.shape} after conversion, model "
                    f"expects {tuple(shape)}"
                )
            hosts.append(host)
        sharding = shardings.get(path)
        if isinstance(sharding, nnx.Variable):
            sharding = sharding.get_value()
        if stacked:
            getters = [lambda h=h: h for h in hosts]
            var.set_value(_place_stacked(getters, var.shape, cfg.param_dtype, sharding))
        else:
            var.set_value(place(hosts[0], cfg.param_dtype, sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(
    path: str,
    *,
    dtype="float32",
    param_dtype=None,
    mesh: Mesh | None = None,
    rules=None,
    **config_overrides,
) -> Transformer:
    """Loads a Hugging Face model folder (``config.json`` + safetensors) without torch.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` or a sharded index.
      dtype: compute dtype (``"float32"``, ``"bfloat16"``).
      param_dtype: storage dtype of the weights (default: ``dtype``).
      mesh: when given, every weight is created sharded over it by its logical axes.
      config_overrides: ``ModelConfig`` fields that ``config.json`` does not hold
        (``scan_layers``, ``remat_policy``, ``attention_impl`` ...).

    Raises:
      FileNotFoundError: the folder, ``config.json`` or weight files are missing.
      ValueError: unsupported ``model_type``; a missing weight or one of the wrong shape (its
        name and both shapes are in the message).
    """
    path = os.path.expanduser(path)
    cfg = ModelConfig.from_pretrained(
        path, dtype=dtype, param_dtype=param_dtype, **config_overrides
    )
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
    """Yields ``(hf_name, host array)`` for every weight, gathering shards across hosts (each
    stacked parameter is fetched once and cut into its layers on the host)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    np_dtype = np.dtype(resolve_dtype(dtype)) if dtype is not None else None
    fetched: dict[Path, np.ndarray] = {}
    for spec in weight_specs(model.cfg):
        if spec.path not in fetched:
            fetched.clear()  # one parameter on the host at a time
            value = flat[spec.path].get_value()
            if not value.is_fully_addressable:
                from jax.experimental import multihost_utils

                value = multihost_utils.process_allgather(value, tiled=True)
            host = np.asarray(jax.device_get(value))
            fetched[spec.path] = host if np_dtype is None else host.astype(np_dtype)
        host = fetched[spec.path]
        if spec.layer is not None:
            host = host[spec.layer]
        yield spec.hf_name, np.ascontiguousarray(spec.to_hf(host))


def save_pretrained(
    model: Transformer,
    path: str,
    *,
    tokenizer=None,
    dtype=None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
    adopt: bool = False,
) -> str:
    """Writes a Hugging Face folder that ``transformers.AutoModelForCausalLM`` loads.

    Only process 0 writes on multi-host runs (all processes must call it: gathering is
    collective). ``dtype`` converts the stored weights (default: as held). The folder is
    staged and published by :mod:`meljax.models.output_folder`: a non-empty ``path`` needs
    ``overwrite``, and then only files meljax wrote there are replaced or removed (``adopt``:
    also unlisted model files, for folders meljax owns such as a run's ``workdir/export``).

    Raises:
      ValueError: ``path`` is not empty and ``overwrite`` is false, or it holds files meljax
        did not write that would be replaced or mixed with the new weights.
    """
    if jax.process_index() == 0:
        output_folder.check_destination(path, overwrite=overwrite, adopt=adopt)
    weights = list(iter_hf_weights(model, dtype))
    if jax.process_index() != 0:
        return path
    with output_folder.staged(path, overwrite=overwrite, adopt=adopt) as tmp:
        _write_hf_folder(tmp, model.cfg, weights, tokenizer, dtype, max_shard_bytes)
    return path


def _write_hf_folder(path, cfg, weights, tokenizer, dtype, max_shard_bytes) -> None:
    """Weights, ``config.json`` and the tokenizer into the (empty) folder ``path``."""
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
