"""The training state: :class:`TrainState`, a fresh one (:func:`init_train_state`) and its
placement on a mesh (:func:`train_state_shardings`).

Parameters are kept as float32 *master* weights in the state whatever the model's storage dtype
(``init_train_state(master_dtype=...)``); the model casts them to its compute dtype
(``cfg.dtype``) when it uses them, so gradients and Adam moments are float32 too. The update
that advances the state is ``meljax.rl.update.make_train_step``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from meljax.models.config import resolve_dtype
from meljax.runtime import sharding as shd

__all__ = ["TrainState", "init_train_state", "split_params", "train_state_shardings"]


@struct.dataclass
class TrainState:
    """What changes across updates (the model's ``graphdef`` lives in the step's closure).

    Attributes:
      step: int32 scalar, number of ``train_step`` calls (applied or skipped).
      params: ``nnx.State`` of the model's ``nnx.Param``s (master dtype).
      opt_state: the optax state (moments shaped and sharded like ``params``).
      skipped_steps: int32 scalar, updates dropped for a non-finite loss or gradient.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    skipped_steps: jax.Array

    @property
    def num_updates(self) -> jax.Array:
        """Updates actually applied (the optimizer's own count)."""
        return self.step - self.skipped_steps


def train_state_shardings(state_or_abstract, mesh: Mesh):
    """``NamedSharding``s for a ``TrainState`` (or any tree of params / optimizer state): each
    ``nnx.Param`` (also inside the optimizer state) by its ``logical_axes``, the rest replicated."""
    return shd.param_shardings(state_or_abstract, mesh)


def _cast_floating(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def split_params(model: nnx.Module):
    """``(graphdef, params)`` of a model, ``params`` being its ``nnx.Param`` state."""
    return nnx.split(model, nnx.Param)


def init_train_state(
    model_or_params: nnx.Module | Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    *,
    master_dtype: Any = "float32",
) -> TrainState:
    """A fresh ``TrainState``, sharded over ``mesh`` when given.

    Args:
      model_or_params: a ``Transformer`` or its ``nnx.State`` of params (``split_params``).
      optimizer: e.g. from ``meljax.rl.optim.make_optimizer``.
      mesh: place params and optimizer state by their logical axes (``train_state_shardings``).
      master_dtype: floating params are cast to this (default float32, so bf16 checkpoints train
        with f32 master weights and f32 Adam moments); ``None`` keeps them as they are.
    """
    params = model_or_params
    if isinstance(params, nnx.Module):
        _, params = split_params(params)
    dtype = None if master_dtype is None else resolve_dtype(master_dtype)

    def init(p):
        p = _cast_floating(p, dtype)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=p, opt_state=optimizer.init(p), skipped_steps=zero)

    if mesh is None:
        return jax.jit(init)(params)
    shardings = train_state_shardings(jax.eval_shape(init, params), mesh)
    return jax.jit(init, out_shardings=shardings)(params)
