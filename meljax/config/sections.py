"""The config sections the trainer owns itself (run, model, data, rollout, update, mesh,
checkpoint, logging, export, distributed). The sections of the other packages are declared
where they are used (``LossConfig`` in ``rl/objective.py``, ``MetaConfig`` in
``meta/settings.py``, ...); :mod:`meljax.config.settings` assembles them all."""

from __future__ import annotations

import dataclasses

from meljax.config.schema import option, validate_fields
from meljax.sampling import SamplingParams

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int = option(0, "master seed: data order, sampling keys, pair selection", minimum=0)
    total_steps: int = option(10, "optimizer steps of the run; rerun larger to continue", minimum=1)

    def __post_init__(self):
        validate_fields(self)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    path: str = option("demo", 'HF folder, a .gguf file, or "demo" (the embedded SmolLM2-135M)')
    tokenizer: str = option("", 'tokenizer folder; "" = model.path')
    dtype: str = option("float32", "compute dtype of activations", choices=DTYPES)
    param_dtype: str = option(
        "float32",
        "storage dtype of loaded weights (training keeps optim.master_dtype)",
        choices=DTYPES,
    )
    random_init: bool = option(False, "True: random weights from model.random (tests, smoke runs)")

    def __post_init__(self):
        validate_fields(self)


@dataclasses.dataclass(frozen=True)
class RandomModelSettings:
    model_type: str = option("llama", "architecture family", choices=("llama", "qwen2", "qwen3"))
    hidden_size: int = option(32, "d_model", minimum=1)
    intermediate_size: int = option(64, "MLP width", minimum=1)
    num_layers: int = option(2, "decoder blocks", minimum=1)
    num_heads: int = option(4, "query heads", minimum=1)
    num_kv_heads: int = option(2, "key/value heads (GQA)", minimum=1)
    head_dim: int = option(8, "per-head width", minimum=1)

    def __post_init__(self):
        validate_fields(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = option(
        "arithmetic",
        "arithmetic (procedural) | file | tfds (array_record)",
        choices=("arithmetic", "file", "tfds"),
    )
    path: str = option(
        "",
        "source=file: a JSONL / JSON / Parquet file or folder (local, gs://, ...); source=tfds: "
        "a TFDS dataset folder (meljax.data.tfds_builder or any builder, array_record) or the "
        "name of a dataset prepared under data.tfds_data_dir (never downloaded)",
    )
    preset: str = option(
        "",
        'layout preset (dapo_math_17k, math500, ...); "" = infer from the path, else the '
        "question / answer (/ id) fields",
    )
    split: str = option("train", 'source=tfds: the split to read (slices such as "train[:1000]")')
    tfds_data_dir: str = option(
        "", 'source=tfds with a dataset name: its data dir ("" = the tfds default)'
    )
    limit: int = option(0, "use only the first N problems (0 = all)", minimum=0)
    on_bad_row: str = option(
        "error", "skipped rows are counted and logged", choices=("error", "skip")
    )
    shuffle: bool = option(True, "shuffle questions each epoch (seeded)")
    arithmetic_min: int = option(0, "smallest operand of procedural problems")
    arithmetic_max: int = option(9, "largest operand")
    arithmetic_ops: str = option("+", 'operators to draw from, e.g. "+-*"')
    arithmetic_exclude: str = option(
        "",
        "a file of problems (question field) that procedural problems never produce: keeps a "
        'held-out evaluation set out of training ("" = none)',
    )

    def __post_init__(self):
        validate_fields(self)
        if self.source in ("file", "tfds") and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path")
        if self.arithmetic_min > self.arithmetic_max:
            raise ValueError("data.arithmetic_min is larger than data.arithmetic_max")
        bad = set(self.arithmetic_ops) - set("+-*")
        if bad:
            raise ValueError(f"data.arithmetic_ops has unsupported operators {sorted(bad)}")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    num_questions: int = option(4, "questions per step (global, across all hosts)", minimum=1)
    group_size: int = option(4, "G: sampled answers per question (GRPO needs >= 2)", minimum=2)
    max_new_tokens: int = option(256, "answer length limit (tokens)", minimum=1)
    temperature: float = option(1.0, "sampling temperature of rollouts", minimum=0)
    top_p: float = option(1.0, "nucleus sampling (1 = off)", minimum=1e-9)
    top_k: int = option(0, "top-k sampling (0 = off)", minimum=0)
    cache_dtype: str = option(
        "", 'KV-cache dtype; "" = model.dtype (bfloat16 halves its memory)', choices=("", *DTYPES)
    )
    max_slots: int = option(
        0,
        "decode slots of the rollout engine (one sample each; rollouts, MEL passes and "
        "evaluation share it); 0 = num_questions x group_size",
        minimum=0,
    )
    kv_budget_gib: float = option(
        0.0,
        "most KV-cache GiB per device for the engine's slot pool (0 = no limit); fewer slots "
        "when it binds",
        minimum=0,
    )
    segment_steps: int = option(
        16, "decode steps per jitted segment, between harvests and refills of slots", minimum=1
    )
    shrink_tail: str = option(
        "auto",
        "when no request waits and the live samples fit in half the slots, move them into a "
        "smaller pool (one more compiled decode program per size; KV memory up to 1.5x the "
        "pool while they move); auto = on for CPU only",
        choices=("auto", "on", "off"),
    )
    tensor_parallel: int = option(
        1,
        "tensor-parallel size of the rollout weights' inference layout (1 = the compute-dtype "
        "weights replicated on every device: no gathers per decode step)",
        minimum=1,
    )
    dynamic_sampling: bool = option(
        False,
        "DAPO dynamic sampling: groups whose answers are all right or all wrong (zero "
        "advantage) are replaced by groups of further questions, sampled in extra rounds",
    )
    max_sampling_rounds: int = option(
        3,
        "dynamic_sampling: sampling rounds per step at most (the batch is then topped up with "
        "zero-advantage groups, so its shape never changes)",
        minimum=1,
    )
    overlong_buffer: int = option(
        0,
        "DAPO soft overlong penalty: the last N tokens before max_new_tokens cost up to "
        "overlong_penalty, linearly (0 = off; counted in tokens)",
        minimum=0,
    )
    overlong_penalty: float = option(
        1.0, "the penalty of an answer that reaches max_new_tokens", minimum=0
    )

    def __post_init__(self):
        validate_fields(self)
        if self.top_p > 1:
            raise ValueError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(
                f"rollout.overlong_buffer={self.overlong_buffer} exceeds "
                f"rollout.max_new_tokens={self.max_new_tokens}"
            )

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.group_size
        )


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    old_logprobs: str = option(
        "sampler", "sampler (returned by the sampler) | recompute", choices=("sampler", "recompute")
    )
    num_passes: int = option(1, "optimizer passes over each rollout batch (mu)", minimum=1)
    num_microbatches: int = option(
        1, "gradient accumulation; exact, not a mean of means", minimum=1
    )
    share_prompt: bool = option(
        True,
        "each prompt's forward and backward once per group of answers (its keys and values "
        "shared by the group's G answers; same numbers); off: every answer row repeats its "
        "prompt",
    )

    def __post_init__(self):
        validate_fields(self)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = option(1, "pure data parallel axis size")
    fsdp: int = option(-1, "fully sharded data parallel axis size (-1 = all remaining devices)")
    tensor: int = option(1, "tensor parallel axis size")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = option(5, "save every N steps (and always at the end)", minimum=1)
    max_to_keep: int = option(2, "older checkpoints are deleted", minimum=1)
    directory: str = option("", 'where checkpoints go; "" = WORKDIR/checkpoints')

    def __post_init__(self):
        validate_fields(self)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = option(True, "also write TensorBoard event files")
    progress_bar: str = option(
        "auto", "auto (on a terminal) | on | off", choices=("auto", "on", "off")
    )
    log_every: int = option(1, "plain log line every N steps when the bar is off", minimum=1)
    wandb: bool = option(
        False, 'also log metrics to Weights & Biases (pip install "meljax[wandb]")'
    )
    wandb_project: str = option("meljax", "W&B project")
    wandb_entity: str = option("", 'W&B entity (team or user); "" = W&B\'s default')
    wandb_name: str = option("", 'W&B run name; "" = the run folder\'s name')
    wandb_mode: str = option(
        "",
        'online | offline | disabled; "" = W&B\'s default (WANDB_MODE)',
        choices=("", "online", "offline", "disabled"),
    )

    def __post_init__(self):
        validate_fields(self)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    at_end: bool = option(True, "write WORKDIR/export (a Hugging Face folder) at the end")
    dtype: str = option("", '"" = as trained; or bfloat16 / float32', choices=("", *DTYPES))

    def __post_init__(self):
        validate_fields(self)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    initialize: str = option(
        "auto", "auto (on multi-host TPU) | always | never", choices=("auto", "always", "never")
    )
    # Explicit cluster (GPU nodes without SLURM, several processes on one machine): all three
    # set, or none (then JAX detects TPU / SLURM / ... by itself).
    coordinator_address: str = option("", "host:port of process 0's coordinator")
    num_processes: int = option(0, "processes in the job (0 = detect)")
    process_id: int = option(-1, "this process's index in [0, num_processes) (-1 = detect)")

    def __post_init__(self):
        validate_fields(self)
        given = (bool(self.coordinator_address), self.num_processes > 0, self.process_id >= 0)
        if any(given) and not all(given):
            raise ValueError(
                "distributed.coordinator_address, num_processes and process_id go together: "
                "set all three or none"
            )
        if all(given) and self.process_id >= self.num_processes:
            raise ValueError(
                f"distributed.process_id={self.process_id} must be below "
                f"distributed.num_processes={self.num_processes}"
            )


# (config section, dataclass) in ConfigDict order; a section may take several dataclasses.
