"""Builds what a run needs from its config: mesh, model, tokenizer, policy, verifier, data."""

from __future__ import annotations

import jax
from flax import nnx

from meljax.config.sections import (
    DataConfig,
    MeshConfig,
    ModelSettings,
    RandomModelSettings,
    RolloutConfig,
)
from meljax.data import PRESETS, ArithmeticProblems, load_problems, make_problem_iterator
from meljax.data.tfds_builder import ArrayRecordProblems
from meljax.models import (
    ModelConfig,
    Transformer,
    from_pretrained,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from meljax.models.tokenizer import make_tiny_tokenizer
from meljax.rewards import Verifier
from meljax.runtime import sharding as shd
from meljax.sampling.policy import Policy


def build_mesh(m: MeshConfig):
    """The device mesh of the ``mesh`` section."""
    return shd.make_mesh({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor})


def build_model_and_tokenizer(m: ModelSettings, r: RandomModelSettings, seed: int, *, mesh=None):
    """The policy model of the ``model`` section (random weights from ``model.random`` drawn
    with ``seed`` when ``random_init``; sharded over ``mesh`` when given) and its tokenizer."""
    if m.random_init:
        tokenizer = load_tokenizer(m.tokenizer) if m.tokenizer else make_tiny_tokenizer()
        model = Transformer(random_model_config(m, r, tokenizer), rngs=nnx.Rngs(seed))
        if mesh is not None:
            graphdef, state = nnx.split(model)
            state = jax.device_put(state, shd.param_shardings(state, mesh))
            model = nnx.merge(graphdef, state)
        return model, tokenizer
    path = resolve_model_path(m.path)
    model = from_pretrained(path, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh)
    tokenizer = load_tokenizer(resolve_model_path(m.tokenizer) if m.tokenizer else path)
    return model, tokenizer


def random_model_config(m: ModelSettings, r: RandomModelSettings, tokenizer) -> ModelConfig:
    """The architecture of ``model.random_init`` runs (``model.random``, the tokenizer's size)."""
    return ModelConfig(
        model_type=r.model_type,
        vocab_size=len(tokenizer),
        hidden_size=r.hidden_size,
        intermediate_size=r.intermediate_size,
        num_layers=r.num_layers,
        num_heads=r.num_heads,
        num_kv_heads=r.num_kv_heads,
        head_dim=r.head_dim,
        qk_norm=r.model_type == "qwen3",
        attention_bias=r.model_type == "qwen2",
        eos_token_id=tokenizer.eos_token_id,
        dtype=_dt(m.dtype),
        param_dtype=_dt(m.param_dtype),
    )


def _dt(name: str):
    return resolve_dtype(name)


def engine_options(s) -> dict:
    """The rollout engine's settings (``ContinuousEngine`` keywords) of a run with settings
    ``s``: its prompt limit covers the longest prompt it is sent (the filled analysis prompt);
    ``max_slots`` 0 means one slot per rollout sample (``num_questions x group_size``)."""
    r = s.rollout
    return {
        "cache_dtype": r.cache_dtype or None,
        "max_prompt_len": max(s.prompt.max_prompt_tokens, s.mel.analysis_max_prompt_tokens),
        "max_slots": r.max_slots or r.num_questions * r.group_size,
        "kv_budget_gib": r.kv_budget_gib,
        "segment_steps": r.segment_steps,
        "shrink_tail": {"auto": None, "on": True, "off": False}[r.shrink_tail],
        "tensor_parallel": r.tensor_parallel,
    }


def build_policy(s, graphdef, tokenizer, mesh=None):
    """The run's :class:`~meljax.sampling.policy.Policy` (settings ``s``): rollouts, MEL
    analyses and replays and the periodic evaluation all sample through it (one
    continuous-batching engine)."""

    return Policy.build(graphdef, tokenizer, s.prompt, mesh=mesh, **engine_options(s))


def build_problem_source(d: DataConfig, seed: int):
    """A random-access source of the ``data`` section's ``Problem`` records and how many rows
    were skipped (``seed`` draws the arithmetic problems)."""
    if d.source == "arithmetic":
        return (
            ArithmeticProblems(
                seed=seed,
                min_value=d.arithmetic_min,
                max_value=d.arithmetic_max,
                ops=tuple(d.arithmetic_ops),
                exclude=_excluded_questions(d.arithmetic_exclude, d.on_bad_row),
            ),
            0,
        )
    if d.source == "tfds":
        return _tfds_source(d), 0
    result = load_problems(d.path, d.preset or None, on_bad_row=d.on_bad_row, limit=d.limit or None)
    if len(result) == 0:
        raise ValueError(f"data.path={d.path!r}: no usable problems")
    return list(result), result.num_skipped


def _excluded_questions(path: str, on_bad_row: str) -> frozenset[str]:
    """The question texts of ``data.arithmetic_exclude`` (empty without one)."""
    if not path:
        return frozenset()
    result = load_problems(path, None, on_bad_row=on_bad_row)
    if len(result) == 0:
        raise ValueError(f"data.arithmetic_exclude={path!r}: no problems in the file")
    return frozenset(p.question for p in result)


def _tfds_source(d: DataConfig):
    """``data.source=tfds``: array_record records read lazily (bad records are errors)."""
    if d.preset and d.preset not in PRESETS:
        raise ValueError(f"data.preset={d.preset!r} is not one of {sorted(PRESETS)}")
    return ArrayRecordProblems(
        d.path,
        split=d.split,
        fields=PRESETS[d.preset] if d.preset else None,
        limit=d.limit or None,
        data_dir=d.tfds_data_dir or None,
    )


def build_data_iterator(d: DataConfig, r: RolloutConfig, seed: int, source):
    """Batches of ``rollout.num_questions`` questions of ``source``, in the order ``seed`` and
    ``data.shuffle`` give.

    Every process reads the same global batch: the host-side work of a step (rewards, pairs,
    prompt filling) is then identical on all hosts, and each jitted call receives the same
    global numpy arrays, which JAX places shard by shard on each host's devices. Only the
    device work (sampling, the update) is divided between hosts.
    """
    return make_problem_iterator(
        source,
        batch_size=r.num_questions,
        seed=seed,
        shuffle=d.shuffle,
        drop_remainder=True,
    )


def build_verifier(s):
    """The run's :class:`~meljax.rewards.Verifier` (``s.reward``; host-shared on several
    processes)."""

    return Verifier(s.reward)
