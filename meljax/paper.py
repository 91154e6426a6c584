"""The paper's setups (Qwen3-Base on DAPO-Math-17k, MEL vs GRPO), shared by configs/qwen3_*.py."""

from __future__ import annotations

from meljax.config import base_config

# Benchmarks of the paper, as laid out in the shared data folder (see data/README.md).
PAPER_BENCHMARKS = ",".join(
    [
        "aime24=data/aime24/test.jsonl",
        "aime25=data/aime25/aime25.jsonl",
        "amc23=data/amc23/test.jsonl",
        "math500=data/math500/test.jsonl",
        "olympiadbench=data/olympiadbench/test.jsonl",
    ]
)

# (model folder placeholder, mesh (data, fsdp, tensor), microbatches) per size, for a
# v5p-64 / v6e-64 slice (32 / 64 chips). Override --config.mesh.* for other slices.
SIZES = {
    "4b": ("Qwen3-4B-Base", (1, -1, 1), 4),
    "8b": ("Qwen3-8B-Base", (1, -1, 1), 8),
    "14b": ("Qwen3-14B-Base", (1, -1, 4), 16),
}


def paper_config(size: str, *, mel: bool):
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    name, (data, fsdp, tensor), micro = SIZES[size]
    c = base_config()
    c.total_steps = 140  # the paper trains for about 120-140 steps
    c.model.path = f"~/models/{name}"  # local HF folder on every host (tpu/setup.sh --weights)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.data.source = "file"
    c.data.path = "data/dapo_math_17k/dapo_math_17k.parquet"
    c.data.preset = "dapo_math_17k"
    c.data.prompt_template = "raw"  # base models: no chat template
    c.data.stop_strings = ("\nQuestion:",)  # a base model that starts the next question stops
    c.data.max_prompt_tokens = 1024
    c.reward.mode = "boxed"
    c.reward.num_workers = 16
    c.rollout.num_questions = 128
    c.rollout.group_size = 8
    c.rollout.max_new_tokens = 4096
    c.rollout.temperature = 1.0
    c.rollout.cache_dtype = "bfloat16"
    # decode with the training mesh's tensor groups: 14B (tensor=4) keeps a quarter of its bf16
    # weights per chip instead of all of them (decode 62.9 GiB per v5p chip, not 85.5)
    c.rollout.tensor_parallel = tensor
    c.algorithm.num_microbatches = micro
    c.mel.enabled = mel
    c.mel.analysis_max_prompt_tokens = 6144
    c.mel.analysis_max_new_tokens = 1024
    c.mel.replay_max_new_tokens = 4096
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    c.checkpoint.every_steps = 10
    c.checkpoint.max_to_keep = 3
    c.eval.every_steps = 20
    c.eval.benchmarks = PAPER_BENCHMARKS
    c.eval.num_samples = 8
    c.eval.temperature = 0.6
    c.eval.max_new_tokens = 4096
    c.export.dtype = "bfloat16"
    return c
