"""Builds what a run needs from its config: mesh, model, tokenizer, data, prompt rendering."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from meljax import sharding as shd
from meljax.data import (
    DEFAULT_INSTRUCTION,
    DEMO_INSTRUCTION,
    ArithmeticProblems,
    format_prompt,
    load_problems,
    make_problem_iterator,
)
from meljax.models import (
    ModelConfig,
    Transformer,
    from_pretrained,
    load_tokenizer,
    resolve_model_path,
)
from meljax.models.tokenizer import make_tiny_tokenizer


def build_mesh(cfg: ml_collections.ConfigDict):
    return shd.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor})


def build_model_and_tokenizer(cfg: ml_collections.ConfigDict, *, mesh=None):
    """The policy model (sharded over ``mesh`` when given) and its tokenizer."""
    m = cfg.model
    if m.random_init:
        tokenizer = load_tokenizer(m.tokenizer) if m.tokenizer else make_tiny_tokenizer()
        model = Transformer(random_model_config(cfg, tokenizer), rngs=nnx.Rngs(cfg.seed))
        if mesh is not None:
            graphdef, state = nnx.split(model)
            state = jax.device_put(state, shd.param_shardings(state, mesh))
            model = nnx.merge(graphdef, state)
        return model, tokenizer
    path = resolve_model_path(m.path)
    model = from_pretrained(path, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh)
    tokenizer = load_tokenizer(resolve_model_path(m.tokenizer) if m.tokenizer else path)
    return model, tokenizer


def random_model_config(cfg: ml_collections.ConfigDict, tokenizer) -> ModelConfig:
    """The architecture of ``model.random_init`` runs (``model.random``, the tokenizer's size)."""
    m, r = cfg.model, cfg.model.random
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


def init_state(cfg: ml_collections.ConfigDict, params, optimizer, mesh):
    """The run's ``TrainState``: master weights and Adam moments in ``optim.master_dtype``
    (float32 unless asked otherwise, whatever ``model.param_dtype`` stores the weights in)."""
    from meljax.train_step import init_train_state

    return init_train_state(params, optimizer, mesh, master_dtype=cfg.optim.master_dtype)


def _dt(name: str):
    from meljax.models import resolve_dtype

    return resolve_dtype(name)


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the tokenizer and the model config (deduplicated, order kept)."""
    from meljax.sampling.generate import stop_token_ids as from_tokenizer_and_config

    return from_tokenizer_and_config(tokenizer, model.cfg)


def pad_token_id(tokenizer, stop_ids: list[int]) -> int:
    """The tokenizer's pad id, or the first stop id when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]


def build_sampler(cfg: ml_collections.ConfigDict, graphdef, stop_ids, pad_id: int, mesh):
    """The one jitted sampler of a run: rollouts, analyses and replays all go through it, so
    its prompt limit covers the longest of them (the filled analysis prompt)."""
    from meljax.sampling import Sampler

    return Sampler(
        graphdef,
        stop_token_ids=stop_ids,
        pad_id=pad_id,
        mesh=mesh,
        cache_dtype=cfg.rollout.cache_dtype or None,
        max_prompt_len=max(cfg.data.max_prompt_tokens, cfg.mel.analysis_max_prompt_tokens),
    )


def rollout_sampling(cfg: ml_collections.ConfigDict):
    """Sampling controls of the rollouts (G answers per question)."""
    from meljax.sampling import SamplingParams

    r = cfg.rollout
    return SamplingParams(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        num_samples=r.group_size,
    )


def instruction_text(cfg: ml_collections.ConfigDict) -> str:
    name = cfg.data.instruction
    return {"default": DEFAULT_INSTRUCTION, "demo": DEMO_INSTRUCTION}.get(name, name)


def prompt_renderer(cfg: ml_collections.ConfigDict, tokenizer):
    """``question -> full prompt text`` (chat template or raw) with the task instruction."""
    instruction = instruction_text(cfg)
    system = cfg.data.system_prompt or None

    def render(question: str, *, with_instruction: bool = True) -> str:
        return format_prompt(
            question,
            tokenizer=tokenizer,
            template=cfg.data.prompt_template,
            instruction=instruction if with_instruction else "",
            system_prompt=system,
        )

    return render


def message_renderer(cfg: ml_collections.ConfigDict, tokenizer):
    """``user message -> full prompt text`` without the task instruction (MEL's prompts carry
    their own instructions)."""
    system = cfg.data.system_prompt or None

    def render(message: str) -> str:
        return format_prompt(
            message,
            tokenizer=tokenizer,
            template=cfg.data.prompt_template,
            instruction="",
            system_prompt=system,
        )

    return render


def build_problem_source(cfg: ml_collections.ConfigDict):
    """A random-access source of ``Problem`` records and how many rows were skipped."""
    d = cfg.data
    if d.source == "arithmetic":
        return (
            ArithmeticProblems(
                seed=cfg.seed,
                min_value=d.arithmetic_min,
                max_value=d.arithmetic_max,
                ops=tuple(d.arithmetic_ops),
            ),
            0,
        )
    result = load_problems(d.path, d.preset or None, on_bad_row=d.on_bad_row, limit=d.limit or None)
    if len(result) == 0:
        raise ValueError(f"data.path={d.path!r}: no usable problems")
    return list(result), result.num_skipped


def build_data_iterator(cfg: ml_collections.ConfigDict, source):
    """Batches of ``rollout.num_questions`` questions.

    Every process reads the same global batch: the host-side work of a step (rewards, pairs,
    prompt filling) is then identical on all hosts, and each jitted call receives the same
    global numpy arrays, which JAX places shard by shard on each host's devices. Only the
    device work (sampling, the update) is divided between hosts.
    """
    return make_problem_iterator(
        source,
        batch_size=cfg.rollout.num_questions,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        drop_remainder=True,
    )


class InProcessVerifier:
    """``score`` / ``close`` like ``VerifierPool``, scoring in this process (num_workers=0)."""

    def __init__(self, config):
        self.config = config

    def score(self, completions, answers):
        from meljax.rewards.pool import score_in_process

        return score_in_process(completions, answers, self.config)

    def close(self) -> None:
        pass


def build_verifier(cfg: ml_collections.ConfigDict):
    """The reward verifier of a run: a pool of spawned processes, or in-process."""
    from meljax.rewards import RewardConfig, VerifierPool

    config = RewardConfig(mode=cfg.reward.mode, timeout_s=cfg.reward.timeout_s)
    if cfg.reward.num_workers == 0:
        return InProcessVerifier(config)
    return VerifierPool(cfg.reward.num_workers, config=config)
