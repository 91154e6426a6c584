"""The optimizer: AdamW with warmup + constant / cosine / linear schedule and global-norm clipping.

Parameters are trained as float32 master weights (see ``meljax.train_step.init_train_state``), so
the Adam moments are float32 as well, whatever the model's storage ``param_dtype``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from meljax.losses import _from_mapping

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters.

    Attributes:
      learning_rate: peak learning rate (after warmup).
      schedule: ``constant``, ``cosine`` (decay to ``min_lr_ratio * lr`` at ``total_steps``) or
        ``linear`` (same end point, linear decay).
      warmup_steps: linear warmup from 0 over this many optimizer updates.
      total_steps: length of the decay (updates, warmup included); needed by cosine / linear.
      min_lr_ratio: final learning rate as a fraction of the peak.
      b1, b2, eps: Adam moments and epsilon.
      weight_decay: decoupled weight decay, applied to matrices only (ndim >= 2; not to norms
        or biases).
      max_grad_norm: global-norm clipping threshold (<= 0: no clipping).
    """

    learning_rate: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"OptimizerConfig.schedule={self.schedule!r}; choose one of {SCHEDULES}"
            )
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"OptimizerConfig: schedule={self.schedule!r} needs total_steps "
                f"({self.total_steps}) > warmup_steps ({self.warmup_steps})"
            )
        if self.learning_rate < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"OptimizerConfig: learning_rate={self.learning_rate} and "
                f"warmup_steps={self.warmup_steps} must be >= 0"
            )

    @classmethod
    def from_mapping(cls, mapping) -> OptimizerConfig:
        """From a flat mapping / ``ml_collections.ConfigDict``; unknown keys are ignored."""
        return _from_mapping(cls, mapping)


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
    cfg: OptimizerConfig | dict | object,
) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (+ clipping) and its learning-rate schedule.

    Args:
      cfg: an ``OptimizerConfig`` or anything ``OptimizerConfig.from_mapping`` accepts.

    Returns:
      ``(optimizer, schedule)``; ``schedule(count)`` gives the learning rate of update
      ``count`` (0-based), for logging.
    """
    if not isinstance(cfg, OptimizerConfig):
        cfg = OptimizerConfig.from_mapping(cfg)
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
