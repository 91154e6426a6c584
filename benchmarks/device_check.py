"""Accelerator check: the update step's MFU and decode throughput on random weights.

On a CUDA GPU (the default shapes): a Qwen3-1.7B-shaped model with random weights, bf16
compute, f32 master weights and Adam moments (as ``meljax train`` keeps them); it times

- the update (``make_train_step``, GRPO loss, gradient accumulation) on ``--batch`` rows of
  ``--seq`` tokens, and reports model FLOP/s as a fraction of the chip's peak (MFU; target
  >= 40% on an H100). Model FLOPs per step follow PaLM (no credit for recomputation):
  ``tokens * (6 * N + 12 * layers * heads * head_dim * seq)``;
- sampling (``ContinuousEngine``, the trainer's rollout engine) at ``--decode_batch`` slots: new tokens
  per second with the decode loop running to ``--new_tokens`` (no stop token).

``--tiny`` runs the same code on a 2-layer model with small shapes (the test suite runs it on
CPU so the script cannot rot). The peak FLOP/s is looked up for known GPUs (``--peak_tflops``
overrides it); on CPU it is the measured matmul rate of the same dtype. Prints one line per
figure and, last, a JSON line with all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import matmul_flops_per_s

# dense bf16 peak FLOP/s per device (vendor data sheets; SXM parts)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(args, dtype) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "given"
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        for name, peak in PEAK_BF16.items():
            if name in dev.device_kind:
                return peak, f"{dev.device_kind} data sheet"
    rate = matmul_flops_per_s(dtype)
    return rate, f"measured {jnp.dtype(dtype).name} matmul"


def model_config(args):
    from meljax.models import ModelConfig
    from meljax.plan.architectures import BUILTIN

    dtypes = dict(dtype=args.dtype, param_dtype="float32")
    if args.tiny:
        hf = dict(
            BUILTIN["qwen3-1.7b"],
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=512,
        )
    else:
        hf = BUILTIN[args.model]
    return ModelConfig.from_hf_dict(hf, **dtypes)


def time_update(args, cfg, graphdef, params) -> dict:
    from meljax.rl import objective as losses
    from meljax.rl import optim
    from meljax.rl import update as ts
    from meljax.rl.batch import TrainBatch, build_policy_batch, build_sequence_batch

    opt, sched = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-6))
    state = ts.init_train_state(params, opt, master_dtype="float32")
    step = ts.make_train_step(
        graphdef,
        opt,
        losses.LossConfig(use_mel=False, logprob_chunk=args.chunk),
        num_microbatches=args.microbatches,
        schedule=sched,
    )
    rng = np.random.default_rng(0)
    b, t, prompt = args.batch, args.seq, args.seq // 4
    policy = build_policy_batch(
        [list(rng.integers(1, cfg.vocab_size, prompt)) for _ in range(b)],
        [list(rng.integers(1, cfg.vocab_size, t - prompt)) for _ in range(b)],
        advantages=rng.normal(size=b),
        rewards=rng.integers(0, 2, b),
        group_index=np.arange(b) // 8,
        old_logprobs=[list(rng.normal(-2.0, 0.5, t - prompt)) for _ in range(b)],
        max_len=t,
        batch_buckets=(b,),
    )
    mel = build_sequence_batch([], [], min_rows=1, max_len=32)
    batch = jax.device_put(TrainBatch(policy, mel))
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    tokens = b * t
    per_token = 6 * cfg.num_params + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t
    return {
        "update_s": seconds,
        "update_compile_s": compile_s,
        "update_tokens_per_s": tokens / seconds,
        "update_flops_per_s": tokens * per_token / seconds,
        "update_loss_finite": bool(np.isfinite(float(metrics["loss"]))),
    }


def time_decode(args, cfg, graphdef, params) -> dict:
    """The rollout engine (what every caller samples with): one slot per row, no stop ids."""
    from meljax.sampling import ContinuousEngine, Request, SamplingParams

    rows = args.decode_batch
    engine = ContinuousEngine(
        graphdef, stop_token_ids=[], pad_id=0, cache_dtype=args.dtype, max_slots=rows
    )
    rng = np.random.default_rng(1)
    prompts = [tuple(rng.integers(1, cfg.vocab_size, args.prompt_len)) for _ in range(rows)]
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    requests = [Request(p, sampling) for p in prompts]
    weights = engine.prepare(params)  # compute dtype, inference layout: once, as served

    def run(seed):
        out = engine.generate(weights, requests, jax.random.key(seed))
        return sum(len(g.tokens) for group in out for g in group)

    t0 = time.perf_counter()
    run(0)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        generated = run(i + 1)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {
        "decode_rows": rows,
        "decode_s": seconds,
        "decode_compile_s": compile_s,
        "decode_tokens_per_s": generated / seconds,
        "decode_ms_per_step": 1e3 * seconds / args.new_tokens,
        "decode_slot_utilisation": engine.last_stats.slot_utilisation,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="2-layer model, small shapes (CPU test)")
    p.add_argument("--model", default="qwen3-1.7b", help="built-in architecture (random weights)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--batch", type=int, default=32, help="update rows")
    p.add_argument("--seq", type=int, default=2048, help="update tokens per row")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--chunk", type=int, default=512, help="log-prob chunk (tokens)")
    p.add_argument("--decode_batch", type=int, default=256, help="sampling rows")
    p.add_argument("--prompt_len", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed repetitions (after a warm-up)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="override the peak FLOP/s")
    p.add_argument("--skip_decode", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.microbatches, args.chunk = 4, 64, 2, 32
        args.decode_batch, args.prompt_len, args.new_tokens = 8, 16, 8
        args.steps = min(args.steps, 2)

    from flax import nnx

    from meljax.models import Transformer

    dev = jax.devices()[0]
    print(f"jax {jax.__version__}; device: {dev.device_kind} ({dev.platform})", flush=True)
    cfg = model_config(args)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    del model
    print(
        f"model: {'tiny' if args.tiny else args.model} shapes, {cfg.num_params / 1e9:.3f}B "
        f"params, {cfg.num_layers} layers, random weights, compute {args.dtype}",
        flush=True,
    )
    peak, peak_source = peak_flops(args, jnp.dtype(args.dtype))
    result = {
        "device": dev.device_kind,
        "platform": dev.platform,
        "model": "tiny" if args.tiny else args.model,
        "params": cfg.num_params,
        "dtype": args.dtype,
        "peak_flops": peak,
        "peak_source": peak_source,
    }
    result |= time_update(args, cfg, graphdef, params)
    result["mfu"] = result["update_flops_per_s"] / peak
    print(
        f"update: {args.batch} x {args.seq} tokens in {args.microbatches} micro-batches: "
        f"{result['update_s']:.3f} s/step, {result['update_tokens_per_s']:.0f} tokens/s, "
        f"{result['update_flops_per_s'] / 1e12:.3g} TFLOP/s = {100 * result['mfu']:.1f}% of "
        f"{peak / 1e12:.3g} TFLOP/s ({peak_source}); target >= 40% on a GPU",
        flush=True,
    )
    if not args.skip_decode:
        result |= time_decode(args, cfg, graphdef, params)
        print(
            f"decode: {result['decode_rows']} rows, {args.prompt_len}-token prompts, "
            f"{args.new_tokens} new tokens: {result['decode_tokens_per_s']:.0f} tokens/s "
            f"({result['decode_ms_per_step']:.2f} ms per step)",
            flush=True,
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
