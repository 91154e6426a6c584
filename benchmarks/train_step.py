"""Throughput of the update step on SmolLM2-135M (CPU by default), and where its time goes.

Measures the wall time of ``train_step`` on a GRPO batch of ``--batch`` sequences of ``--seq``
tokens, its tokens/s, and its model FLOPs utilisation against the measured matmul rate of the
same machine and dtype (a 2048x2048 ``jnp.dot``, timed between the steps), plus the peak
resident memory of the process.

Model FLOPs per step (PaLM's convention, no credit for recomputation):
``tokens * (6 * N + 12 * layers * heads * head_dim * seq)``, N = parameter count (the tied
embedding counted once: it is the LM-head matmul).

Where the time goes: the compiled step's executed matmul FLOPs are read from its HLO
(``meljax.plan.hlo_cost``, loop trip counts applied), so the report splits the gap to the matmul rate into
*recomputation* (executed / model FLOPs: remat of the blocks, the rematerialised log-prob
chunks) and *matmul efficiency* (executed FLOP/s / matmul rate).

``--variants`` compares several ways to run the same step in one process, timed round-robin
(one step of each per round, a matmul timing between rounds), so that a busy machine slows all
of them alike: a variant is a remat policy (``none``, ``full``, ``dots``, ``dots_no_batch``;
``auto``; ``default`` = the model config's; the log-prob chunks always recompute their logits in
the backward pass: a custom VJP in ``meljax.rl.logprobs``), optionally with ``+einsum``: the layers'
weight matmuls as plain einsums, without the CPU matmul path of ``meljax.models.layers.dense``
(how the update ran before it), and/or ``+unrolled``: the layers unrolled instead of scanned
(``scan_layers=False``), and/or ``+shared``: the shared-prompt update
(``algorithm.share_prompt``, ``meljax.rl.shared_prompt``): each group of ``--group`` rows
shares one prompt of ``--prompt`` tokens, whose forward then runs once per group (the flat
variants run the same rows, each repeating its prompt). ``--with_ref`` also times the
forward-only log-prob pass (``make_compute_logprobs``: the KL reference or recomputed old
log-probs). ``--profile DIR`` writes a ``jax.profiler`` trace of the timed steps.

Rows: ``--batch`` answers in groups of ``--group`` to one prompt of ``--prompt`` tokens,
each answer ``--seq`` less the bucketed prompt length (a rollout batch's layout: rows of the
bucketed longest prompt plus ``max_new_tokens``).

Usage: ``python benchmarks/train_step.py [--batch 16] [--seq 256] [--steps 3]
[--microbatches 4] [--variants full,none,dots,default+shared] [--group 8] [--chunk 128]
[--with_ref] [--random]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import matmul_flops_per_s
from flax import nnx

from meljax.models import ModelConfig, Transformer, layers
from meljax.models.config import REMAT_POLICIES
from meljax.plan import hlo_cost
from meljax.rl import objective as losses
from meljax.rl import optim
from meljax.rl import update as ts
from meljax.rl.batch import TrainBatch, build_policy_batch, build_sequence_batch
from meljax.rl.shared_prompt import group_policy_batch
from meljax.runtime import hostmem
from meljax.runtime.buckets import bucket


def make_batch(
    batch: int, seq: int, prompt: int, vocab: int, mel_rows: int, group: int
) -> TrainBatch:
    rng = np.random.default_rng(0)
    answer = seq - bucket(prompt)
    if answer < 1:
        raise SystemExit(f"--seq {seq} leaves no answer tokens after a {prompt}-token prompt")
    per_group = [list(rng.integers(1, vocab, prompt)) for _ in range(-(-batch // group))]
    prompts = [per_group[i // group] for i in range(batch)]
    comps = [list(rng.integers(1, vocab, answer)) for _ in range(batch)]
    pol = build_policy_batch(
        prompts,
        comps,
        advantages=rng.normal(size=batch),
        rewards=rng.integers(0, 2, batch),
        group_index=np.arange(batch) // group,
        old_logprobs=[list(rng.normal(-2.0, 0.5, answer)) for _ in range(batch)],
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


@contextlib.contextmanager
def remat_policy(cfg: ModelConfig, policy: str):
    """Yields the model config of a variant: its remat policy (``default``: the config's own);
    a ``+einsum`` suffix traces the layers' plain einsums instead of the CPU matmul path
    (``meljax.models.layers.dense``), i.e. the update as it was before that path; ``+unrolled``
    unrolls the layers (``scan_layers=False``)."""
    policy, *suffixes = policy.split("+")
    unknown = set(suffixes) - {"einsum", "unrolled", "shared"}
    if unknown:
        raise SystemExit(f"unknown variant suffix {sorted(unknown)}: +einsum, +unrolled, +shared")
    before = layers.CPU_MATMUL_VJP
    layers.CPU_MATMUL_VJP = "einsum" not in suffixes
    if policy != "default":
        cfg = cfg.replace(remat_policy=policy)
    if "unrolled" in suffixes:
        cfg = cfg.replace(scan_layers=False)
    try:
        yield cfg
    finally:
        layers.CPU_MATMUL_VJP = before


@dataclasses.dataclass
class Variant:
    name: str
    compiled: object
    compile_s: float
    executed_flops: float
    state: object
    times: list
    rates: list  # matmul FLOP/s around each timed call
    batch: object  # the flat TrainBatch, or its shared-prompt form (+shared)


def build_variant(name, base_cfg, params, opt, sched, loss_cfg, batch, micro, group) -> Variant:
    if name.partition("+")[0] not in ("default",) + REMAT_POLICIES:
        raise SystemExit(f"unknown variant {name!r}: one of default, {', '.join(REMAT_POLICIES)}")
    with remat_policy(base_cfg, name) as cfg:
        graphdef = ts.split_params(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]
        step = ts.make_train_step(graphdef, opt, loss_cfg, num_microbatches=micro, schedule=sched)
        state = ts.init_train_state(params, opt)
        if "shared" in name.split("+")[1:]:
            grouped = group_policy_batch(batch.policy, group, batch_multiple=micro)
            if grouped is None:
                raise SystemExit(f"--batch {len(batch.policy.advantages)}: not whole groups")
            batch = jax.device_put(batch.replace(policy=grouped))
        t = time.perf_counter()
        compiled = step.lower(state, batch).compile()  # the program the trainer runs
        compile_s = time.perf_counter() - t
    executed = hlo_cost.program_cost(compiled.as_text()).flops  # matmul FLOPs the step really runs
    return Variant(name, compiled, compile_s, executed, state, [], [], batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64, help="context tokens per row (no loss)")
    p.add_argument("--group", type=int, default=8, help="answers per prompt (rows per group)")
    p.add_argument("--steps", type=int, default=3, help="timed rounds (after one warm-up step)")
    p.add_argument("--chunk", type=int, default=128, help="log-prob chunk size (tokens)")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--mel_rows", type=int, default=0, help="meta-experience rows (0: no MEL)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--variants", default="default", help="comma-separated, see the docstring")
    p.add_argument(
        "--attention", default="default", help="model attention_impl, when it has one (auto ...)"
    )
    p.add_argument("--random", action="store_true", help="random weights of the same shapes")
    p.add_argument("--with_ref", action="store_true", help="also time the forward-only pass")
    p.add_argument("--profile", default="", help="write a jax.profiler trace to this folder")
    args = p.parse_args()

    # as `meljax train` does (before JAX starts its threads); MELJAX_HOST_MALLOC=default turns it off
    print(f"host malloc: {hostmem.keep_freed_memory()}")
    dtype = jnp.dtype(args.dtype)
    print(f"jax {jax.__version__}, devices: {jax.devices()}")
    from meljax.plan.architectures import BUILTIN

    if args.random:
        cfg = ModelConfig.from_hf_dict(BUILTIN["smollm2-135m"], dtype=args.dtype)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
    else:
        from meljax.models import demo_model_dir, from_pretrained

        model = from_pretrained(demo_model_dir(), dtype=args.dtype)
        cfg = model.cfg
    _, params = ts.split_params(model)
    del model
    if args.attention != "default":
        cfg = cfg.replace(attention_impl=args.attention)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    opt, sched = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-6))
    loss_cfg = losses.LossConfig(use_mel=args.mel_rows > 0, logprob_chunk=args.chunk)
    batch = make_batch(args.batch, args.seq, args.prompt, cfg.vocab_size, args.mel_rows, args.group)
    variants = [
        build_variant(v, cfg, params, opt, sched, loss_cfg, batch, args.microbatches, args.group)
        for v in args.variants.split(",")
    ]
    batch = jax.device_put(batch)
    for v in variants:  # warm-up step (first-run allocations)
        v.state, m = v.compiled(v.state, v.batch)
        jax.block_until_ready(m)
    ref_fn, ref_inputs = None, {}
    if args.with_ref:  # the flat pass, and the shared-prompt one when a variant is +shared
        graphdef = ts.split_params(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]
        ref_fn = ts.make_compute_logprobs(graphdef, chunk_size=args.chunk)
        ref_inputs = {"flat": batch.policy.seq}
        shared = [v for v in variants if "shared" in v.name.split("+")[1:]]
        if shared:
            ref_inputs["shared"] = shared[0].batch.policy
        for x in ref_inputs.values():
            jax.block_until_ready(ref_fn(params, x))
    ref_times = {k: [] for k in ref_inputs}
    ref_rates = {k: [] for k in ref_inputs}
    if args.profile:
        jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
    # A matmul timing before and after every timed call: on a shared machine the load drifts,
    # so each call is scored against the mean of the two rates around it.
    rates = [matmul_flops_per_s(dtype)]
    for _ in range(args.steps):
        for v in variants:
            t = time.perf_counter()
            v.state, m = v.compiled(v.state, v.batch)
            jax.block_until_ready((v.state, m))
            v.times.append(time.perf_counter() - t)
            rates.append(matmul_flops_per_s(dtype))
            v.rates.append((rates[-2] + rates[-1]) / 2)
        for k, x in ref_inputs.items():
            t = time.perf_counter()
            jax.block_until_ready(ref_fn(params, x))
            ref_times[k].append(time.perf_counter() - t)
            rates.append(matmul_flops_per_s(dtype))
            ref_rates[k].append((rates[-2] + rates[-1]) / 2)
    if args.profile:
        jax.profiler.stop_trace()
    rate = statistics.median(rates)

    tokens = args.batch * args.seq + args.mel_rows * args.seq
    per_token = 6 * n_params + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.seq
    flops = tokens * per_token
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"model: {n_params / 1e6:.1f}M params, {cfg.num_layers} layers, vocab {cfg.vocab_size}")
    print(
        f"batch {args.batch} x {args.seq} (+{args.mel_rows} MEL rows), chunk {args.chunk}, "
        f"micro-batches {args.microbatches}, dtype {args.dtype}; "
        f"model FLOPs/step {flops / 1e12:.2f} TFLOP"
    )
    print(
        f"matmul 2048^3 {dtype.name} per round (GFLOP/s): "
        + ", ".join(f"{r / 1e9:.1f}" for r in rates)
        + f"; median {rate / 1e9:.1f}"
    )
    for v in variants:
        med = statistics.median(v.times)
        mfu = statistics.median(flops / t / r for t, r in zip(v.times, v.rates, strict=True))
        busy = statistics.median(
            v.executed_flops / t / r for t, r in zip(v.times, v.rates, strict=True)
        )
        # the rate drifts with other tenants' load: also score the median step against the
        # median of every rate measured in the run
        mfu_run = flops / med / rate
        print(
            f"[{v.name}] compile {v.compile_s:.0f} s; steps (s): "
            + ", ".join(f"{x:.2f}" for x in v.times)
            + f"; median {med:.2f} s = {tokens / med:.0f} tokens/s; "
            f"MFU vs the matmul rate around each step: {100 * mfu:.1f}% (median), vs the "
            f"run's median rate: {100 * mfu_run:.1f}%; executed "
            f"matmul FLOPs {v.executed_flops / flops:.2f}x the model FLOPs, run at "
            f"{100 * busy:.1f}% of the matmul rate"
        )
    for k, times in ref_times.items():
        fwd = args.batch * args.seq * (2 * n_params)
        eff = statistics.median(fwd / t / r for t, r in zip(times, ref_rates[k], strict=True))
        print(
            f"forward-only log-probs (reference / old), {k}: steps (s): "
            + ", ".join(f"{x:.2f}" for x in times)
            + f"; median {statistics.median(times):.2f} s = {100 * eff:.1f}% of the matmul "
            "rate (2N FLOPs per flat token)"
        )
    print(f"peak RSS: {rss_gib:.2f} GiB")


if __name__ == "__main__":
    main()
