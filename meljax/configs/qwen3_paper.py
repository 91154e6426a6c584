"""The paper's setups: Qwen3-Base on DAPO-Math-17k, MEL or its GRPO baseline, one file.

``--config=configs/qwen3_paper.py:SIZE,ARM[,v6e]`` (or ``--config=qwen3_paper:8b,mel``):
  SIZE  4b | 8b | 14b   (the model and the mesh / micro-batches that fit a v5p-64 slice)
  ARM   mel | grpo      (MEL: GRPO + the meta-experience NLL term; grpo: MEL off)
  v6e   for a v6e-64 slice (64 chips of a third of v5p's memory): decode weights split 4-way
        and half the decode slots, so every sampling program fits (``meljax plan`` shows it)
128 questions x G=8 a step, lr 1e-6, 140 steps, AIME24/25, AMC23, MATH-500 and OlympiadBench
evaluated every 20 steps. Set the model folder and data paths for your machine, e.g.
  meljax train --config=configs/qwen3_paper.py:8b,mel --workdir=gs://BUCKET/runs/q8-mel \
    --config.model.path=~/models/Qwen3-8B-Base
Every field and its meaning: ``python -m meljax.config.settings``.
"""

from meljax.config.settings import base_config

# Benchmarks of the paper, as laid out in the shared data folder (see data/README.md).
BENCHMARKS = ",".join(
    [
        "aime24=data/aime24/test.jsonl",
        "aime25=data/aime25/aime25.jsonl",
        "amc23=data/amc23/test.jsonl",
        "math500=data/math500/test.jsonl",
        "olympiadbench=data/olympiadbench/test.jsonl",
    ]
)

# model folder name, mesh (data, fsdp, tensor) and micro-batches per size, for a v5p-64 slice
# (32 chips); override --config.mesh.* for other slices
SIZES = {
    "4b": ("Qwen3-4B-Base", (1, -1, 1), 4),
    "8b": ("Qwen3-8B-Base", (1, -1, 1), 4),  # 4: one prompt group per chip (shared prompts)
    "14b": ("Qwen3-14B-Base", (1, -1, 4), 16),
}
ARMS = ("mel", "grpo")
SLICES = ("v5p", "v6e")


def parse_variant(arg: str) -> tuple[str, bool, str]:
    """``"8b,mel[,v6e]"`` -> ``(size, mel, slice)``; one line naming the bad part otherwise."""
    parts = [p.strip().lower() for p in (arg or "").split(",") if p.strip()]
    if len(parts) not in (2, 3) or parts[0] not in SIZES or parts[1] not in ARMS:
        raise ValueError(
            f"qwen3_paper.py:{arg!r}: expected SIZE,ARM[,v6e] with SIZE in {sorted(SIZES)} "
            f"and ARM in {ARMS}, e.g. qwen3_paper.py:8b,mel"
        )
    slice_ = parts[2] if len(parts) == 3 else "v5p"
    if slice_ not in SLICES:
        raise ValueError(f"qwen3_paper.py:{arg!r}: the slice is one of {SLICES}, not {slice_!r}")
    return parts[0], parts[1] == "mel", slice_


def get_config(arg: str = "8b,mel"):
    size, mel, slice_ = parse_variant(arg)
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
    # weights per chip instead of all of them
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
    c.eval.benchmarks = BENCHMARKS
    c.eval.num_samples = 8
    c.eval.temperature = 0.6
    c.eval.max_new_tokens = 4096
    c.export.dtype = "bfloat16"
    if slice_ == "v6e":
        if size == "8b":  # 64 chips x 4 cannot split 128 groups: flat rows, 8 micro-batches
            c.algorithm.num_microbatches = 8
        c.rollout.tensor_parallel = 4  # decode weights split over 4 chips, 16 replicas
        c.rollout.max_slots = 512  # the 1,024 answers of a step decode in two waves
    return c
