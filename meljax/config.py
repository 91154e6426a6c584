"""The training configuration: every field, its default and its meaning, plus validation.

Config files in ``configs/`` start from :func:`base_config` and override fields; the command line
overrides further (``--config.rollout.group_size=8``). The returned ``ConfigDict`` is locked, so a
misspelt key is an error, not a silently ignored setting.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # master seed: data order, sampling keys, pair selection all derive from it
    c.total_steps = 10  # optimizer steps of the run; rerun with a larger value to continue

    c.model = ml_collections.ConfigDict()
    c.model.path = "demo"  # HF folder, a .gguf file, or "demo" (the embedded SmolLM2-135M)
    c.model.tokenizer = ""  # tokenizer folder; "" = model.path
    c.model.dtype = "float32"  # compute dtype of activations: float32 | bfloat16
    c.model.param_dtype = (
        "float32"  # storage dtype of loaded weights (training: optim.master_dtype)
    )
    c.model.random_init = False  # True: random weights from model.random (tests, smoke runs)
    c.model.random = ml_collections.ConfigDict()  # architecture for random_init
    c.model.random.model_type = "llama"  # llama | qwen2 | qwen3
    c.model.random.hidden_size = 32  # d_model
    c.model.random.intermediate_size = 64  # MLP width
    c.model.random.num_layers = 2  # decoder blocks
    c.model.random.num_heads = 4  # query heads
    c.model.random.num_kv_heads = 2  # key/value heads (GQA)
    c.model.random.head_dim = 8  # per-head width

    c.data = ml_collections.ConfigDict()
    c.data.source = "arithmetic"  # arithmetic (procedural, no files) | file
    c.data.path = ""  # file or folder for source=file (local, gs://, ...)
    c.data.preset = ""  # layout preset (dapo_math_17k, math500, gsm8k, ...); "" = infer from path
    c.data.limit = 0  # use only the first N problems (0 = all)
    c.data.on_bad_row = "error"  # error | skip (skipped rows are counted and logged)
    c.data.shuffle = True  # shuffle questions each epoch (seeded)
    c.data.arithmetic_min = 0  # smallest operand of procedural problems
    c.data.arithmetic_max = 9  # largest operand
    c.data.arithmetic_ops = "+"  # operators to draw from, e.g. "+-*"
    c.data.prompt_template = "chat"  # chat (tokenizer's chat template) | raw (base models)
    c.data.instruction = "default"  # "default" (step by step, \boxed{}), "demo", or literal text
    c.data.system_prompt = ""  # optional system message for chat prompts
    c.data.max_prompt_tokens = 512  # longer prompts are cut from the left (counted)

    c.reward = ml_collections.ConfigDict()
    c.reward.mode = "boxed"  # answer extraction: boxed | last_number | boxed_or_last_number
    c.reward.timeout_s = 5.0  # per-answer verifier time limit; a hung answer scores 0
    c.reward.num_workers = 2  # verifier processes (0 = in-process)

    c.rollout = ml_collections.ConfigDict()
    c.rollout.num_questions = 4  # questions per step (global, across all hosts)
    c.rollout.group_size = 4  # G: sampled answers per question (>= 2)
    c.rollout.max_new_tokens = 256  # answer length limit (tokens)
    c.rollout.temperature = 1.0  # sampling temperature of rollouts
    c.rollout.top_p = 1.0  # nucleus sampling (1 = off)
    c.rollout.top_k = 0  # top-k sampling (0 = off)
    c.rollout.cache_dtype = ""  # KV-cache dtype; "" = model.dtype (bfloat16 halves its memory)

    c.algorithm = ml_collections.ConfigDict()
    c.algorithm.name = "grpo"  # grpo (policy gradient) | rft (NLL on correct answers)
    c.algorithm.advantage = "grpo"  # grpo | drgrpo | reinforce_pp | rloo
    c.algorithm.eps_low = 0.2  # lower clip range of the ratio
    c.algorithm.eps_high = 0.2  # upper clip range of the ratio
    c.algorithm.aggregation = "seq_mean_token_mean"  # | token_mean | seq_mean_token_sum_norm
    c.algorithm.kl_beta = 0.0  # weight of the KL to a frozen reference (0 = no reference kept)
    c.algorithm.kl_estimator = "k3"  # k1 | k3
    c.algorithm.old_logprobs = "sampler"  # sampler (returned by the sampler) | recompute
    c.algorithm.num_passes = 1  # optimizer passes over each rollout batch (mu)
    c.algorithm.num_microbatches = 1  # gradient accumulation; exact, not a mean of means
    c.algorithm.rft_threshold = 0.5  # rft: answers with reward above this are trained on
    c.algorithm.logprob_chunk = 256  # sequence chunk for log-probs (bounds [B, chunk, vocab])

    c.mel = ml_collections.ConfigDict()
    c.mel.enabled = True  # False = the plain algorithm (the paper's baseline)
    c.mel.lambda_mel = 1.0  # weight of the meta-experience NLL term
    c.mel.max_pairs_per_query = 2  # contrastive pairs per mixed question
    c.mel.analysis_max_prompt_tokens = 1024  # filled analysis prompt limit (answers shortened)
    c.mel.analysis_max_new_tokens = 1024  # meta-experience length limit
    c.mel.analysis_temperature = 1.0  # sampling temperature of the analysis pass
    c.mel.analysis_top_p = 1.0  # nucleus sampling of the analysis pass
    c.mel.replay_max_new_tokens = 256  # replay answer length limit
    c.mel.replay_temperature = 1.0  # sampling temperature of the replay pass
    c.mel.nll_bucketed = (
        False  # True: NLL batch sized to the kept rows (more compiles, less memory)
    )
    c.mel.filter_leaks = True  # drop meta-experiences that contain the ground-truth answer
    c.mel.analysis_template = ""  # "" = built-in; else template text or a path to a file
    c.mel.replay_template = ""  # "" = built-in; else template text or a path to a file

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6  # peak learning rate
    c.optim.schedule = "constant"  # constant | cosine (after warmup)
    c.optim.warmup_steps = 0  # linear warmup steps
    c.optim.b1 = 0.9  # AdamW beta1
    c.optim.b2 = 0.999  # AdamW beta2
    c.optim.eps = 1e-8  # AdamW epsilon
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay
    c.optim.max_grad_norm = 1.0  # global-norm gradient clipping (0 = off)
    # dtype of the trained (master) weights and both Adam moments, whatever model.param_dtype
    # stores the checkpoint in: bfloat16 halves their memory but rounds away small updates
    c.optim.master_dtype = "float32"  # float32 | bfloat16

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # pure data parallel axis size
    c.mesh.fsdp = -1  # fully sharded data parallel axis size (-1 = all remaining devices)
    c.mesh.tensor = 1  # tensor parallel axis size

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 5  # save every N steps (and always at the end)
    c.checkpoint.max_to_keep = 2  # older checkpoints are deleted

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # run evaluation every N steps (0 = never during training)
    c.eval.benchmarks = ""  # comma-separated PATH or PRESET=PATH entries
    c.eval.limit = 0  # problems per benchmark (0 = all)
    c.eval.num_samples = 8  # k of Avg@k / Pass@k
    c.eval.temperature = 0.6  # sampling temperature of Avg@k / Pass@k
    c.eval.max_new_tokens = 1024  # answer length limit at evaluation

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True  # also write TensorBoard event files
    c.logging.progress_bar = "auto"  # auto (on a terminal) | on | off
    c.logging.log_every = 1  # plain log line every N steps when the bar is off

    c.export = ml_collections.ConfigDict()
    c.export.at_end = True  # write WORKDIR/export (a Hugging Face folder) when the run ends
    c.export.dtype = ""  # "" = as trained; or bfloat16 / float32

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"  # auto (on multi-host TPU) | always | never
    # Explicit cluster (GPU nodes without SLURM, several processes on one machine): all three
    # set, or none (then JAX detects TPU / SLURM / ... by itself).
    c.distributed.coordinator_address = ""  # host:port of process 0's coordinator
    c.distributed.num_processes = 0  # processes in the job (0 = detect)
    c.distributed.process_id = -1  # this process's index in [0, num_processes) (-1 = detect)
    c.lock()
    return c


def _fail(msg: str):
    raise ValueError(f"config: {msg}")


def validate_distributed(dist: ml_collections.ConfigDict) -> None:
    """Checks the ``distributed`` section (before any JAX start-up)."""
    if dist.initialize not in ("auto", "always", "never"):
        _fail(f"distributed.initialize={dist.initialize!r} is not one of auto, always, never")
    given = (bool(dist.coordinator_address), dist.num_processes > 0, dist.process_id >= 0)
    if any(given) and not all(given):
        _fail(
            "distributed.coordinator_address, num_processes and process_id go together: "
            "set all three or none"
        )
    if all(given) and dist.process_id >= dist.num_processes:
        _fail(
            f"distributed.process_id={dist.process_id} must be below "
            f"distributed.num_processes={dist.num_processes}"
        )


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks values early, with one clear message naming the field."""
    choices = {
        "data.source": ("arithmetic", "file"),
        "data.prompt_template": ("chat", "raw"),
        "data.on_bad_row": ("error", "skip"),
        "reward.mode": ("boxed", "last_number", "boxed_or_last_number"),
        "algorithm.name": ("grpo", "rft"),
        "algorithm.advantage": ("grpo", "drgrpo", "reinforce_pp", "rloo"),
        "algorithm.aggregation": ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"),
        "algorithm.kl_estimator": ("k1", "k3"),
        "algorithm.old_logprobs": ("sampler", "recompute"),
        "optim.schedule": ("constant", "cosine"),
        "model.dtype": ("float32", "bfloat16"),
        "model.param_dtype": ("float32", "bfloat16"),
        "optim.master_dtype": ("float32", "bfloat16"),
        "logging.progress_bar": ("auto", "on", "off"),
    }
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = cfg[section][name]
        if value not in allowed:
            _fail(f"{key}={value!r} is not one of {allowed}")
    validate_distributed(cfg.distributed)
    if cfg.rollout.group_size < 2:
        _fail(f"rollout.group_size={cfg.rollout.group_size}: GRPO needs at least 2 answers")
    for key in (
        "total_steps",
        "rollout.num_questions",
        "rollout.max_new_tokens",
        "mel.max_pairs_per_query",
        "mel.analysis_max_new_tokens",
        "mel.replay_max_new_tokens",
        "algorithm.num_passes",
        "algorithm.num_microbatches",
        "checkpoint.every_steps",
        "checkpoint.max_to_keep",
        "data.max_prompt_tokens",
    ):
        value = (
            cfg[key.split(".")[0]] if "." not in key else cfg[key.split(".")[0]][key.split(".")[1]]
        )
        if value < 1:
            _fail(f"{key}={value} must be at least 1")
    if cfg.optim.learning_rate < 0:
        _fail(f"optim.learning_rate={cfg.optim.learning_rate} must not be negative")
    if cfg.rollout.temperature < 0 or cfg.mel.analysis_temperature < 0:
        _fail("temperatures must not be negative")
    if not 0 < cfg.rollout.top_p <= 1:
        _fail(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    if cfg.algorithm.eps_low < 0 or cfg.algorithm.eps_high < 0:
        _fail("algorithm.eps_low / eps_high must not be negative")
    if cfg.mel.lambda_mel < 0 or cfg.algorithm.kl_beta < 0:
        _fail("mel.lambda_mel and algorithm.kl_beta must not be negative")
    if cfg.data.source == "file" and not cfg.data.path:
        _fail("data.source='file' needs data.path")
    if cfg.eval.every_steps and not cfg.eval.benchmarks:
        _fail("eval.every_steps is set but eval.benchmarks is empty")
    if cfg.data.arithmetic_min > cfg.data.arithmetic_max:
        _fail("data.arithmetic_min is larger than data.arithmetic_max")
    bad_ops = set(cfg.data.arithmetic_ops) - set("+-*")
    if bad_ops:
        _fail(f"data.arithmetic_ops has unsupported operators {sorted(bad_ops)}")
    if not cfg.model.random_init and not cfg.model.path:
        _fail("model.path is empty")
    if num_devices is not None:
        sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
        fixed = 1
        for s in sizes:
            if s == 0 or s < -1:
                _fail(f"mesh sizes must be positive or -1, got {sizes}")
            fixed *= s if s > 0 else 1
        if sizes.count(-1) > 1:
            _fail(f"at most one mesh axis may be -1, got {sizes}")
        if (-1 in sizes and num_devices % fixed) or (-1 not in sizes and fixed != num_devices):
            _fail(
                f"mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor} does "
                f"not divide the {num_devices} devices"
            )
