"""Device mesh and logical-axis sharding.

Every weight of the model carries *logical* axis names (e.g. ``("embed", "mlp")``) in its
``nnx.Param`` metadata under ``logical_axes``. A small rule table maps each logical axis onto
zero or more *mesh* axes. The default mesh has three axes:

- ``data``:   pure data parallelism (the batch is split, weights are replicated),
- ``fsdp``:   the batch is split *and* weights are sharded (ZeRO-3 style),
- ``tensor``: Megatron-style tensor parallelism inside each layer.

Activations carry logical axes too: the model calls ``constrain(x, ("batch", None, None))`` at
block boundaries, on attention heads, MLP and logits chunks. ``constrain`` is a no-op unless a
mesh is in context (``use_mesh(mesh)``, usable inside ``jit``; ``jax.set_mesh`` outside), so
the model stays mesh-agnostic while the update step, the log-prob function and the sampler run
it batch-sharded: the residual stream ``[B, T, D]`` is split over ``(data, fsdp)`` by rows,
weights are all-gathered per layer (in the compute dtype) and gradients reduce-scattered.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. ``None`` means replicated along that dimension.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "seq": None,
    "layers": None,  # the leading axis of stacked per-layer weights: never sharded
}

_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar("meljax_rules", default=None)


def make_mesh(
    shape: Mapping[str, int] | Sequence[int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_names: Sequence[str] = MESH_AXES,
) -> Mesh:
    """Builds a device mesh.

    Args:
      shape: sizes per axis, e.g. ``{"data": 1, "fsdp": 8, "tensor": 1}`` or ``(1, 8, 1)``. One
        entry may be ``-1`` (it takes all remaining devices). ``None`` puts every device on ``fsdp``.
      devices: devices to use (default: all of ``jax.devices()``).
      axis_names: mesh axis names, in order.

    Raises:
      ValueError: the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if shape is None:
        sizes = [n if a == "fsdp" else 1 for a in axis_names]
    elif isinstance(shape, Mapping):
        unknown = set(shape) - set(axis_names)
        if unknown:
            raise ValueError(f"mesh: unknown axis names {sorted(unknown)}; known: {axis_names}")
        sizes = [int(shape.get(a, 1)) for a in axis_names]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(axis_names):
            raise ValueError(f"mesh: shape {sizes} has {len(sizes)} entries, axes {axis_names}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if rest <= 0 or n % rest:
            raise ValueError(f"mesh: {sizes} does not divide the {n} devices")
        sizes[sizes.index(-1)] = n // rest
    if any(s < 1 for s in sizes) or math.prod(sizes) != n:
        raise ValueError(
            f"mesh: axis sizes {dict(zip(axis_names, sizes, strict=True))} multiply to "
            f"{math.prod(sizes)}, but there are {n} devices"
        )
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # non-TPU topologies or odd shapes: plain reshape is fine
        arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, tuple(axis_names))


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec``.

    A mesh axis is used at most once per array; an axis of size 1 is dropped; when ``shape`` and
    ``mesh`` are given, a dimension keeps the longest prefix of its mesh axes that divides it
    (so odd vocabularies, head counts or row counts never fail to shard).
    """
    if not logical_axes:
        return PartitionSpec()
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(logical_axes):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
            # keep the longest prefix of the axes that divides the dimension
            while (
                shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes)
            ):
                axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules=None) -> Iterator[None]:
    """Puts ``mesh`` (and the logical-axis ``rules``) in context for ``constrain``.

    Works inside a traced function (it sets the *abstract* mesh, which ``jax.set_mesh`` refuses
    to do under ``jit``). ``mesh=None`` is a no-op context, so callers need no branch.
    """
    if mesh is None:
        yield
        return
    token = _ACTIVE_RULES.set(rules)
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            yield
    finally:
        _ACTIVE_RULES.reset(token)


def context_mesh():
    """The abstract mesh in context (``use_mesh`` / ``jax.set_mesh``), or ``None``."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def current_platform() -> str:
    """Platform the code in context compiles for: the context mesh's devices (so an AOT
    compile for a TPU topology on a CPU host says ``tpu``), else the default backend."""
    mesh = context_mesh()
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    if device is not None and getattr(device, "platform", None):
        return str(device.platform)
    return jax.default_backend()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names; identity without a mesh in context.

    E.g. ``constrain(h, ("batch", None, "mlp"))`` splits rows over ``(data, fsdp)`` and the MLP
    features over ``tensor``. Dimensions that do not divide their mesh axes stay replicated.
    """
    mesh = context_mesh()
    if mesh is None:
        return x
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return x  # inside shard_map: shardings are manual there
    spec = logical_to_spec(logical_axes, _ACTIVE_RULES.get(), mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def sum_row_groups(x: jax.Array, out_axes: Sequence[str | None]) -> jax.Array:
    """``x.sum(0)`` for ``x`` ``[G, ...]`` whose ``G`` row groups lie one per data shard of the
    mesh in context (logical axis ``batch``), returned laid out by ``out_axes``: one explicit
    reduce-scatter (``psum_scatter`` over the data axes that ``out_axes`` shards a dimension
    over, ``psum`` over the others) instead of an all-reduce. Plain sum without a mesh."""
    mesh = context_mesh()
    out_shape = x.shape[1:]
    if mesh is None:
        return x.sum(0)
    rules = _ACTIVE_RULES.get()
    batch = logical_to_spec(("batch",), rules, mesh, x.shape[:1])[0]
    if batch is None:
        return constrain(x.sum(0), out_axes)
    batch = (batch,) if isinstance(batch, str) else tuple(batch)
    out_spec = logical_to_spec(out_axes, rules, mesh, out_shape)
    plan, in_dims = [], []
    for dim, axes in enumerate(out_spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        scattered = tuple(a for a in axes if a in batch)
        kept = tuple(a for a in axes if a not in batch)
        if scattered:
            plan.append((dim, scattered))
        in_dims.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    rest = tuple(a for a in batch if all(a not in sc for _, sc in plan))

    def local(a):
        a = a[0]
        for dim, axes in plan:
            a = jax.lax.psum_scatter(a, axes, scatter_dimension=dim, tiled=True)
        return jax.lax.psum(a, rest) if rest else a

    in_spec = PartitionSpec(batch if len(batch) > 1 else batch[0], *in_dims)
    return jax.shard_map(local, mesh=mesh, in_specs=in_spec, out_specs=out_spec, check_vma=False)(x)


def param_shardings(abstract_state, mesh: Mesh, rules=None):
    """A pytree of ``NamedSharding`` for an ``nnx.State`` whose leaves carry ``logical_axes``."""
    from flax import nnx

    def one(var):
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        shape = getattr(var, "shape", None) if not isinstance(var, nnx.Variable) else var.shape
        return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, rules=None) -> NamedSharding:
    """Sharding for a batch-major array ``[batch, ...]``: batch over the data axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules=None) -> int:
    """How many ways the batch is split (product of the mesh axes that ``batch`` maps onto)."""
    rules = DEFAULT_RULES if rules is None else rules
    target = rules.get("batch")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def put_global(tree, shardings):
    """Places host values as global arrays with ``shardings`` (a matching pytree).

    Every process holds the whole global value (the trainer computes the same batch on every
    host), so each one fills just the shards of its own devices. ``jax.Array`` leaves pass
    through. On one process this equals ``jax.device_put``; on several it is what a jitted
    function with sharded inputs requires (it refuses numpy arguments there).
    """

    def one(x, sharding):
        if isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree):
    """Fetches a pytree of (possibly multi-host sharded) arrays as numpy arrays.

    Arrays spread over several processes are all-gathered first, so every process gets the
    whole global value.
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)
