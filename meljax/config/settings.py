"""The training configuration, declared once: the settings dataclasses ARE the schema.

Every field, its default, its meaning, its choices and limits are declared in one dataclass
(:data:`SCHEMA` lists them by config section); :func:`base_config` builds the ``ConfigDict``
from them and :func:`settings` / :func:`validate` build them back from it (see
:mod:`meljax.config.schema`). ``python -m meljax.config.settings`` prints every field with its comment.

Config files in ``configs/`` start from :func:`base_config` and override fields; the command line
overrides further (``--config.rollout.group_size=8``). The returned ``ConfigDict`` is locked, so a
misspelt key is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from meljax.config.schema import (
    build_config,
    check_keys,
    describe,
    from_section,
)
from meljax.config.sections import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    ExportConfig,
    LoggingConfig,
    MeshConfig,
    ModelSettings,
    RandomModelSettings,
    RolloutConfig,
    RunConfig,
    UpdateConfig,
)
from meljax.data.prompts import PromptConfig, resolve_instruction
from meljax.evaluation.report import EvalConfig
from meljax.meta.pipeline import MetaConfig
from meljax.rewards.verify import RewardConfig
from meljax.rl.objective import LossConfig
from meljax.rl.optim import OptimizerConfig

SCHEMA: tuple[tuple[str, type], ...] = (
    ("", RunConfig),
    ("model", ModelSettings),
    ("model.random", RandomModelSettings),
    ("data", DataConfig),
    ("data", PromptConfig),
    ("reward", RewardConfig),
    ("rollout", RolloutConfig),
    ("algorithm", LossConfig),
    ("algorithm", UpdateConfig),
    ("mel", MetaConfig),
    ("optim", OptimizerConfig),
    ("mesh", MeshConfig),
    ("checkpoint", CheckpointConfig),
    ("eval", EvalConfig),
    ("logging", LoggingConfig),
    ("export", ExportConfig),
    ("distributed", DistributedConfig),
)


def base_config() -> ml_collections.ConfigDict:
    """Every field at its default (locked)."""
    return build_config(SCHEMA)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every section of a config as its dataclass (derived fields filled in)."""

    run: RunConfig
    model: ModelSettings
    random: RandomModelSettings
    data: DataConfig
    prompt: PromptConfig
    reward: RewardConfig
    rollout: RolloutConfig
    loss: LossConfig
    update: UpdateConfig
    mel: MetaConfig
    optim: OptimizerConfig
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    logging: LoggingConfig
    export: ExportConfig
    distributed: DistributedConfig


def settings(cfg: Any, data_parallel: int = 1) -> Settings:
    """Builds (and so validates) every section; ``data_parallel`` sizes the NLL batch rows."""
    check_keys(cfg, SCHEMA)
    derived: dict[type, dict[str, Any]] = {
        LossConfig: {
            "max_len": cfg.rollout.max_new_tokens,
            "use_mel": cfg.mel.enabled,
            "lambda_mel": cfg.mel.lambda_mel,
        },
        MetaConfig: {
            "replay_instruction": resolve_instruction(cfg.data.instruction),
            "nll_batch_multiple": data_parallel,
            "seed": cfg.seed,
        },
        OptimizerConfig: {
            # one update per pass; the schedule spans the whole run
            "total_steps": max(
                cfg.total_steps * cfg.algorithm.num_passes, cfg.optim.warmup_steps + 1
            )
        },
    }
    built = [from_section(cls, section, cfg, **derived.get(cls, {})) for section, cls in SCHEMA]
    return Settings(*built)


def _fail(msg: str):
    raise ValueError(f"config: {msg}")


def validate_distributed(dist: Any) -> DistributedConfig:
    """Checks the ``distributed`` section (before any JAX start-up)."""
    return from_section(DistributedConfig, "distributed", {"distributed": dist})


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> Settings:
    """Checks values early, with one clear message naming the field; returns the settings."""
    s = settings(cfg)
    if s.eval.every_steps and not s.eval.benchmarks:
        _fail("eval.every_steps is set but eval.benchmarks is empty")
    if s.eval.at_start and not s.eval.benchmarks:
        _fail("eval.at_start is set but eval.benchmarks is empty")
    if not s.model.random_init and not s.model.path:
        _fail("model.path is empty")
    if num_devices is not None:
        sizes = [s.mesh.data, s.mesh.fsdp, s.mesh.tensor]
        fixed = 1
        for n in sizes:
            if n == 0 or n < -1:
                _fail(f"mesh sizes must be positive or -1, got {sizes}")
            fixed *= n if n > 0 else 1
        if sizes.count(-1) > 1:
            _fail(f"at most one mesh axis may be -1, got {sizes}")
        if (-1 in sizes and num_devices % fixed) or (-1 not in sizes and fixed != num_devices):
            _fail(
                f"mesh data={s.mesh.data} fsdp={s.mesh.fsdp} tensor={s.mesh.tensor} does "
                f"not divide the {num_devices} devices"
            )
    return s


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A run's saved ``config.json`` over today's defaults (fields added since keep theirs)."""
    saved = json.loads(text)
    cfg = base_config()
    check_keys(saved, SCHEMA)

    def merge(node: ml_collections.ConfigDict, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, dict):
                merge(node[k], v)
            else:
                node[k] = tuple(v) if isinstance(node[k], tuple) else v

    merge(cfg, saved)
    return cfg


if __name__ == "__main__":
    print("\n".join(describe(SCHEMA)))
