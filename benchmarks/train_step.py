"""Throughput of the update step on SmolLM2-135M (CPU by default).

Measures the median wall time of ``train_step`` on a GRPO batch of ``--batch`` sequences of
``--seq`` tokens (f32), its tokens/s, its model FLOPs utilisation against the measured f32 matmul
rate of the same machine (a 2048x2048 ``jnp.dot``, timed before and after the steps), and the peak
resident memory of the process.

Model FLOPs per step (PaLM's convention, no credit for recomputation):
``tokens * (6 * N + 12 * layers * heads * head_dim * seq)``, N = parameter count (the tied
embedding counted once: it is the LM-head matmul).

Usage: ``python benchmarks/train_step.py [--batch 16] [--seq 256] [--steps 5] [--chunk 128]
[--microbatches 4]``. Memory: the model keeps every layer's activations for the backward pass, so
one 16 x 256 micro-batch needs about 12 GiB of temporaries in f32 (XLA's estimate); 4 micro-batches
of 4 rows need about 3.3 GiB (6.2 GiB peak RSS in all).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meljax import losses, optim
from meljax import train_step as ts
from meljax.batch import TrainBatch, build_policy_batch, build_sequence_batch
from meljax.models import Transformer, demo_model_dir, from_pretrained
from meljax.models.config import REMAT_POLICIES


def matmul_flops_per_s(n: int = 2048, reps: int = 5) -> float:
    """Median f32 FLOP/s of an ``n x n`` by ``n x n`` matmul (2 n^3 FLOPs)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def make_batch(batch: int, seq: int, prompt: int, vocab: int, mel_rows: int) -> TrainBatch:
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, vocab, prompt)) for _ in range(batch)]
    comps = [list(rng.integers(1, vocab, seq - prompt)) for _ in range(batch)]
    pol = build_policy_batch(
        prompts,
        comps,
        advantages=rng.normal(size=batch),
        rewards=rng.integers(0, 2, batch),
        group_index=np.arange(batch) // 8,
        old_logprobs=[list(rng.normal(-2.0, 0.5, seq - prompt)) for _ in range(batch)],
        max_len=seq,
        batch_buckets=(batch,),
    )
    n = max(mel_rows, 1)
    mel = build_sequence_batch(
        [list(rng.integers(1, vocab, seq // 2)) for _ in range(mel_rows)],
        [list(rng.integers(1, vocab, seq // 2)) for _ in range(mel_rows)],
        max_len=seq,
        min_rows=n,
        batch_buckets=(n,),
    )
    return TrainBatch(pol, mel)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64, help="context tokens per row (no loss)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--chunk", type=int, default=128, help="log-prob chunk size (tokens)")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--mel_rows", type=int, default=0, help="meta-experience rows (0: no MEL)")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--remat",
        choices=("default", *REMAT_POLICIES),
        default="default",
        help="per-layer rematerialisation policy (default: the model config's, i.e. auto)",
    )
    p.add_argument("--attention", default="default", help="attention_impl (default: auto)")
    args = p.parse_args()

    print(f"jax {jax.__version__}, devices: {jax.devices()}")
    rate_before = matmul_flops_per_s()
    print(f"matmul 2048^3 f32: {rate_before / 1e9:.1f} GFLOP/s")

    model = from_pretrained(demo_model_dir(), dtype=args.dtype)
    cfg = model.cfg
    graphdef, params = ts.split_params(model)
    overrides = {}
    if args.remat != "default":
        overrides["remat_policy"] = args.remat
    if args.attention != "default":
        overrides["attention_impl"] = args.attention
    if overrides:
        cfg = cfg.replace(**overrides)
        graphdef = ts.split_params(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    opt, sched = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-6))
    state = ts.init_train_state(params, opt)
    del model, params
    loss_cfg = losses.LossConfig(use_mel=args.mel_rows > 0, logprob_chunk_size=args.chunk)
    step = ts.make_train_step(
        graphdef, opt, loss_cfg, num_microbatches=args.microbatches, schedule=sched
    )
    batch = make_batch(args.batch, args.seq, args.prompt, cfg.vocab_size, args.mel_rows)
    batch = jax.device_put(batch)

    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    print(f"compile + first step: {time.perf_counter() - t:.1f} s, loss {float(m['loss']):.4f}")
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    rate_after = matmul_flops_per_s()
    rate = statistics.median([rate_before, rate_after])

    tokens = args.batch * args.seq + args.mel_rows * args.seq
    per_token = 6 * n_params + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.seq
    flops = tokens * per_token
    med = statistics.median(times)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"model: {n_params / 1e6:.1f}M params, {cfg.num_layers} layers, vocab {cfg.vocab_size}")
    print(
        f"batch {args.batch} x {args.seq} (+{args.mel_rows} MEL rows), chunk {args.chunk}, "
        f"micro-batches {args.microbatches}, dtype {args.dtype}, remat {cfg.remat_policy}, "
        f"attention {cfg.attention_impl}"
    )
    print("step times (s): " + ", ".join(f"{x:.2f}" for x in times))
    print(f"median step: {med:.2f} s -> {tokens / med:.0f} tokens/s")
    print(f"model FLOPs/step: {flops / 1e12:.2f} TFLOP -> {flops / med / 1e9:.1f} GFLOP/s")
    print(
        f"matmul rate before/after: {rate_before / 1e9:.1f} / {rate_after / 1e9:.1f} GFLOP/s; "
        f"MFU vs median matmul rate: {100 * flops / med / rate:.1f}%"
    )
    print(f"peak RSS: {rss_gib:.2f} GiB; skipped steps: {int(state.skipped_steps)}")


if __name__ == "__main__":
    main()
