"""The optimizer: AdamW with warmup + constant / cosine / linear schedule and global-norm clipping.

Parameters are trained as float32 master weights (see ``meljax.rl.update.init_train_state``), so
the Adam moments are float32 as well, whatever the model's storage ``param_dtype``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from meljax.config.schema import option, validate_fields

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters (config section ``optim``; see ``meljax.config.schema``)."""

    learning_rate: float = option(1e-6, "peak learning rate (after warmup)", minimum=0)
    schedule: str = option(
        "constant",
        "constant | cosine | linear (decay to min_lr_ratio x the peak at total_steps)",
        choices=SCHEDULES,
    )
    warmup_steps: int = option(0, "linear warmup from 0 over this many updates", minimum=0)
    total_steps: int = option(
        0,
        "updates of the decay, warmup included (cosine / linear)",
        minimum=0,
        derived="total_steps x algorithm.num_passes",
    )
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of the peak", minimum=0)
    b1: float = option(0.9, "AdamW beta1")
    b2: float = option(0.999, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(
        0.0, "AdamW decoupled weight decay, on matrices only (not norms or biases)", minimum=0
    )
    max_grad_norm: float = option(1.0, "global-norm gradient clipping (<= 0: off)")
    master_dtype: str = option(
        "float32",
        "dtype of the trained (master) weights and both Adam moments, whatever "
        "model.param_dtype stores the checkpoint in (bfloat16 halves them but rounds away "
        "small updates)",
        choices=("float32", "bfloat16"),
    )

    def __post_init__(self):
        validate_fields(self)
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"OptimizerConfig: schedule={self.schedule!r} needs total_steps "
                f"({self.total_steps}) > warmup_steps ({self.warmup_steps})"
            )


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the number of applied updates (int scalar -> f32)."""
    peak, warm = cfg.learning_rate, cfg.warmup_steps
    end = peak * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, cfg.total_steps - warm, alpha=cfg.min_lr_ratio)
    else:
        main = optax.linear_schedule(peak, end, cfg.total_steps - warm)
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), main], [warm])


def decay_mask(params):
    """True for leaves that get weight decay: matrices (ndim >= 2), not norm scales / biases.

    Weights under a ``layers`` key are stacked ``[num_layers, ...]`` (meljax.models): their
    leading layer axis does not count, so stacked norm scales and biases get no decay either.
    """

    def one(path, p):
        stacked = any(getattr(k, "key", getattr(k, "name", None)) == "layers" for k in path)
        return jnp.ndim(p) - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(
    cfg: OptimizerConfig,
) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (+ clipping) and its learning-rate schedule.

    Args:
      cfg: the ``optim`` section.

    Returns:
      ``(optimizer, schedule)``; ``schedule(count)`` gives the learning rate of update
      ``count`` (0-based), for logging.
    """
    schedule = make_schedule(cfg)
    adamw = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw), schedule
    return adamw, schedule
