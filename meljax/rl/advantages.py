"""Advantage estimators: rewards ``[num_questions, G]`` (``G`` answers per question) ->
advantages of the same shape, float32 (pure, jittable functions).

:data:`ADVANTAGES` maps the config's names (``algorithm.advantage``) to the estimators;
:func:`compute_advantages` and :func:`advantages_with_eps` pick one by name. A group (or, for
REINFORCE++, a batch) whose rewards are all equal gets advantages of exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "ADVANTAGES",
    "ADV_EPS",
    "advantages_with_eps",
    "compute_advantages",
    "drgrpo_advantages",
    "grpo_advantages",
    "raw_advantages",
    "reinforce_pp_advantages",
    "rloo_advantages",
]


def _all_equal(r: jax.Array, axis=-1) -> jax.Array:
    """True where every reward along ``axis`` equals the first (exact comparison, keepdims)."""
    first = jnp.take(r, jnp.array([0]), axis=axis) if axis is not None else r.reshape(-1)[:1]
    return jnp.all(r == first, axis=axis, keepdims=axis is not None)


# Added to the std of normalised advantages (config ``algorithm.adv_eps``); one value for the
# estimators' defaults and the config's, so an unset key changes nothing.
ADV_EPS = 1e-6


def grpo_advantages(rewards: jax.Array, eps: float = ADV_EPS) -> jax.Array:
    """GRPO: ``(r - mean_group(r)) / (std_group(r) + eps)``, float32 ``[Q, G]``.

    ``std`` is the population std (ddof=0), as in the MEL spec's ``std(r) + eps``. A group whose
    rewards are all equal gets exactly 0 (not ``~0 / eps``: a float mean of equal values need not
    equal them bit for bit).
    """
    r = jnp.asarray(rewards, jnp.float32)
    mean = jnp.mean(r, axis=-1, keepdims=True)
    std = jnp.std(r, axis=-1, keepdims=True)
    return jnp.where(_all_equal(r), 0.0, (r - mean) / (std + eps))


def drgrpo_advantages(rewards: jax.Array) -> jax.Array:
    """Dr.GRPO: ``r - mean_group(r)`` (no std normalisation), float32 ``[Q, G]``; exactly 0 for
    all-equal groups."""
    r = jnp.asarray(rewards, jnp.float32)
    return jnp.where(_all_equal(r), 0.0, r - jnp.mean(r, axis=-1, keepdims=True))


def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """RLOO: ``r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))``, float32 ``[Q, G]``.

    With ``G == 1`` there is no baseline sample and the advantage is 0.
    """
    r = jnp.asarray(rewards, jnp.float32)
    g = r.shape[-1]
    if g < 2:
        return jnp.zeros_like(r)
    centred = r - jnp.mean(r, axis=-1, keepdims=True)
    return jnp.where(_all_equal(r), 0.0, centred * (g / (g - 1)))


def reinforce_pp_advantages(
    rewards: jax.Array, eps: float = ADV_EPS, group_baseline: bool = False
) -> jax.Array:
    """REINFORCE++: rewards normalised over the whole batch, float32 ``[Q, G]``.

    ``A = (x - mean_batch(x)) / (std_batch(x) + eps)`` with ``x = r`` (default; the MEL paper's
    "normalized over the whole batch instead of per group"), or ``x = r - mean_group(r)`` when
    ``group_baseline`` (the "REINFORCE++-baseline" variant). Population std (ddof=0). A batch
    whose ``x`` are all equal gets exactly 0.
    """
    r = jnp.asarray(rewards, jnp.float32)
    x = r - jnp.mean(r, axis=-1, keepdims=True) if group_baseline else r
    adv = (x - jnp.mean(x)) / (jnp.std(x) + eps)
    return jnp.where(_all_equal(x, axis=None), 0.0, adv)


def raw_advantages(rewards: jax.Array) -> jax.Array:
    """The rewards themselves as advantages (no baseline), float32 ``[Q, G]``."""
    return jnp.asarray(rewards, jnp.float32)


ADVANTAGES: dict[str, Callable[..., jax.Array]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "raw": raw_advantages,
    "none": raw_advantages,
}


def compute_advantages(name: str, rewards: jax.Array, **kw) -> jax.Array:
    """Advantages ``[Q, G]`` from rewards ``[Q, G]`` by estimator name (see ``ADVANTAGES``).

    Keyword arguments go to the estimator (e.g. ``eps``); unknown ones raise ``TypeError``.
    """
    try:
        fn = ADVANTAGES[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGES)}"
        ) from None
    r = jnp.asarray(rewards)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [num_questions, G], got shape {r.shape}")
    return fn(r, **kw)


# The estimators that divide by a std and so take ``eps``.
_NORMALISED = ("grpo", "reinforce_pp")


def advantages_with_eps(name: str, rewards: jax.Array, eps: float = ADV_EPS) -> jax.Array:
    """``compute_advantages(name, rewards)`` with ``eps`` where the estimator normalises by a
    std (ignored by the others, so every estimator takes the config's value); ``[Q, G]``."""
    kw = {"eps": eps} if name in _NORMALISED else {}
    return compute_advantages(name, rewards, **kw)
