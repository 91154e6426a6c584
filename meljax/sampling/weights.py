"""The decode copy of the weights: cast to the compute dtype, laid out for inference, once.

:func:`prepare_weights` turns the policy's (training-layout, master-dtype) parameters into the
:class:`InferenceWeights` every engine program reads: the model state in the compute dtype on
the :func:`inference_mesh` (tensor parallelism inside a replica, data-parallel replicas across
the rest of the devices; replicated when ``tensor == 1``), plus per-layer copies on CPU
(``prefer_split_layers``) so no program re-slices the stacked weights. One copy per policy
update: a decode step never gathers FSDP shards.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from meljax.models.layers import layer_weights
from meljax.runtime import sharding as shd
from meljax.sampling.select import config_from_graphdef


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class InferenceWeights:
    """What :meth:`ContinuousEngine.prepare` returns and every engine program reads.

    state: the model's ``nnx.State`` in the compute dtype on the inference layout; layers:
    per-layer weight dicts (CPU, see ``prefer_split_layers``) or ``None``.
    """

    state: Any
    layers: Any


def inference_mesh(mesh: Mesh | None, tensor: int = 1) -> Mesh | None:
    """The decode mesh over the same devices: ``tensor``-way tensor parallelism inside each
    replica, data-parallel replicas (``data``) across the rest; no ``fsdp`` axis, so the
    weights are never gathered per decode step (replicated when ``tensor == 1``)."""
    if mesh is None:
        return None
    n = mesh.devices.size
    if n % tensor:
        raise ValueError(f"rollout.tensor_parallel={tensor} does not divide {n} devices")
    # the training mesh's device order, reshaped: one jitted program (the weights' re-layout)
    # takes arguments on one mesh and returns them on the other, and jit requires both to list
    # the devices in the same order (a topology-aware re-layout of 14B's fsdp=8 x tensor=4 mesh
    # did not). Its minor axis is `tensor`, so with the training tensor size the tensor groups
    # are the training mesh's (ICI neighbours).
    return Mesh(mesh.devices.reshape(n // tensor, 1, tensor), shd.MESH_AXES)


def weight_shardings(graphdef, params, mesh: Mesh, split: bool):
    """The ``NamedSharding`` tree of :func:`prepare_weights`'s output on ``mesh``."""
    cfg = config_from_graphdef(graphdef)
    state = shd.param_shardings(params, mesh)
    layers = None
    if split:
        one = {
            name: NamedSharding(mesh, shd.logical_to_spec(info.axes, None, mesh, info.shape))
            for name, info in layer_weights(cfg).items()
        }
        layers = tuple(dict(one) for _ in range(cfg.num_layers))
    return InferenceWeights(state, layers)


def weights_program(graphdef, params, mesh: Mesh | None = None, split: bool = False):
    """The jitted function ``params -> InferenceWeights`` of :func:`prepare_weights` (its
    ``out_shardings`` are the inference layout on ``mesh``), for running or lowering."""
    cfg = config_from_graphdef(graphdef)

    def cast(x):
        dt = jnp.dtype(cfg.dtype)
        return x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt else x

    # cast where each weight lies now (its training shard), THEN lay it out: the reshard
    # moves compute-dtype bytes and no device ever holds a gathered master-dtype copy
    sharded = all(
        isinstance(getattr(x, "sharding", None), NamedSharding) for x in jax.tree.leaves(params)
    )
    src = jax.tree.map(lambda x: x.sharding, params) if sharded else None

    def build(params):
        def cast_here(x, sharding):
            y = cast(x)
            if y is not x:
                y = jax.lax.with_sharding_constraint(y, sharding)
            return y

        model = nnx.merge(graphdef, params)
        layers = model.split_layers(cfg.dtype) if split else None
        if split:
            state = jax.tree_util.tree_map_with_path(
                lambda path, x: x if "layers" in jax.tree_util.keystr(path) else cast(x), params
            )
        elif src is not None:
            state = jax.tree.map(cast_here, params, src)
        else:
            state = jax.tree.map(cast, params)
        return InferenceWeights(state, layers)

    out_shardings = None
    if mesh is not None:
        out_shardings = weight_shardings(graphdef, params, mesh, split)
    return jax.jit(build, out_shardings=out_shardings)


# the jitted weights programs of this process, newest last: shared by every engine, so a fresh
# Policy (``generate()`` builds one per call) does not trace and compile the program again
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_KEEP = 4  # layouts kept (models or meshes used in one process)


def prepare_weights(
    graphdef, params, mesh: Mesh | None = None, split: bool = False, cache: dict | None = None
) -> InferenceWeights:
    """The weights every engine program reads.

    The state is cast to the model's compute dtype (floating leaves) and laid out on ``mesh``
    (the :func:`inference_mesh`); with ``split`` (CPU) ``layers`` holds per-layer weight dicts
    in the compute dtype and the state's stacked layer weights are left as they are (unused).
    One copy per policy update, never per decode step. ``cache`` (default: this process's
    shared cache, the last few layouts) holds the jitted program between updates and engines,
    keyed by the graph and the weights' layout: a fresh ``jax.jit`` per update or per engine
    would trace and compile it again.
    """
    cfg = config_from_graphdef(graphdef)
    if (
        not split
        and mesh is None
        and all(
            x.dtype == jnp.dtype(cfg.dtype) or not jnp.issubdtype(x.dtype, jnp.floating)
            for x in jax.tree.leaves(params)
        )
    ):
        return InferenceWeights(params, None)  # already what decoding reads: no copy
    layout = jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)), params)
    key = (graphdef, mesh, split, str(jax.tree.structure(params)), str(jax.tree.leaves(layout)))
    cache = _PROGRAMS if cache is None else cache
    if key not in cache:
        while len(cache) >= _KEEP:
            cache.pop(next(iter(cache)))  # the oldest layout
        cache[key] = weights_program(graphdef, params, mesh, split)
    return cache[key](params)
