"""Compile the update step for a TPU topology on this host and report memory and collectives.

No TPU needed: libtpu's compiler runs on a CPU host (``jax.experimental.topologies``); inputs are
abstract (``jax.ShapeDtypeStruct`` with shardings), so nothing is allocated. Default shapes: a
Qwen3-8B-shaped model (36 layers, bf16 compute, f32 master weights, AdamW), policy batch
[1024, 4608] in 8 micro-batches plus a meta-experience NLL batch [256, 7168], on v5p:2x4x4
(32 chips) with mesh data=1 fsdp=32 tensor=1.

  JAX_PLATFORMS=cpu python benchmarks/fsdp_compile.py [--layers 36] [--topology v5p:2x4x4]
      [--mesh 1,32,1] [--remat auto] [--attention auto] [--what update|logprobs]

Prints per-chip argument / output / temporary bytes (``memory_analysis``) and the collectives
of the compiled HLO by kind (``meljax.plan.hlo``), with the largest all-reduces.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import topologies

from meljax.models import ModelConfig, Transformer
from meljax.rl import objective as losses
from meljax.rl import optim
from meljax.rl import update as ts
from meljax.rl.batch import PolicyBatch, SequenceBatch, TrainBatch
from meljax.runtime import sharding as shd

QWEN3_8B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    qk_norm=True,
    tie_word_embeddings=False,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
)
GIB = 2**30


def abstract_seq(rows: int, t: int) -> SequenceBatch:
    s = jax.ShapeDtypeStruct
    return SequenceBatch(
        tokens=s((rows, t), jnp.int32),
        kv_mask=s((rows, t), jnp.bool_),
        positions=s((rows, t), jnp.int32),
        loss_mask=s((rows, t), jnp.float32),
        weight=s((rows,), jnp.float32),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5p:2x4x4")
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--policy", default="1024,4608", help="rows,tokens")
    p.add_argument("--nll", default="256,7168", help="rows,tokens (0,0: no MEL batch)")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--chunk", type=int, default=128, help="log-prob chunk (tokens)")
    p.add_argument("--remat", default="auto")
    p.add_argument("--attention", default="auto")
    p.add_argument("--scan", type=int, default=1, help="scan the layers (1) or unroll (0)")
    # --remat legacy --attention legacy --scan -1: config fields left alone (older trees)
    p.add_argument("--what", default="update", choices=("update", "logprobs"))
    p.add_argument("--hlo", default=None, help="write the compiled HLO text here")
    args = p.parse_args()

    topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    mesh = shd.make_mesh([int(x) for x in args.mesh.split(",")], devices=topo.devices)
    cfg = ModelConfig(
        **QWEN3_8B,
        num_layers=args.layers,
        **({} if args.remat == "legacy" else dict(remat_policy=args.remat)),
        **({} if args.attention == "legacy" else dict(attention_impl=args.attention)),
        **({} if args.scan < 0 else dict(scan_layers=bool(args.scan))),
    )
    graphdef, params = nnx.split(
        nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param
    )
    opt, sched = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-6))

    def init(p):
        zero = jnp.zeros((), jnp.int32)
        return ts.TrainState(step=zero, params=p, opt_state=opt.init(p), skipped_steps=zero)

    state = jax.eval_shape(init, params)
    rows, t = (int(x) for x in args.policy.split(","))
    nll_rows, nll_t = (int(x) for x in args.nll.split(","))
    s = jax.ShapeDtypeStruct
    policy = PolicyBatch(
        seq=abstract_seq(rows, t),
        advantages=s((rows,), jnp.float32),
        old_logprobs=s((rows, t), jnp.float32),
        ref_logprobs=s((rows, t), jnp.float32),
        rewards=s((rows,), jnp.float32),
        group_index=s((rows,), jnp.int32),
    )
    use_mel = nll_rows > 0
    mel = abstract_seq(max(nll_rows, 1), max(nll_t, 1))
    loss_cfg = losses.LossConfig(use_mel=use_mel, logprob_chunk=args.chunk)
    print(f"mesh {dict(mesh.shape)} on {args.topology}; {cfg.num_params / 1e9:.2f}B params")
    tic = time.perf_counter()
    if args.what == "update":
        # the jit that make_train_step builds, spelled out (so this also runs on older trees)
        batch = TrainBatch(policy, mel)
        s_state = ts.train_state_shardings(state, mesh)
        step = jax.jit(
            functools.partial(
                ts.train_step_fn,
                graphdef=graphdef,
                optimizer=opt,
                loss_cfg=loss_cfg,
                num_microbatches=args.microbatches,
                mesh=mesh,
                schedule=sched,
            ),
            in_shardings=(s_state, ts.batch_shardings(batch, mesh)),
            out_shardings=(s_state, shd.replicated(mesh)),
            donate_argnums=(0,),
        )
        compiled = step.lower(state, batch).compile()
    else:
        fn = ts.make_compute_logprobs(
            graphdef, mesh=mesh, chunk_size=args.chunk, num_microbatches=args.microbatches
        )
        compiled = fn.lower(state.params, policy.seq).compile()
    print(f"compile: {time.perf_counter() - tic:.0f} s")
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    total -= ma.alias_size_in_bytes
    print(
        f"per chip: arguments {ma.argument_size_in_bytes / GIB:.2f} GiB, outputs "
        f"{ma.output_size_in_bytes / GIB:.2f} GiB (aliased {ma.alias_size_in_bytes / GIB:.2f}), "
        f"temporaries {ma.temp_size_in_bytes / GIB:.2f} GiB; total {total / GIB:.2f} GiB"
    )
    text = compiled.as_text()
    try:
        from meljax.plan import hlo
    except ImportError:  # a tree from before meljax.plan.hlo: memory only
        return
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(text)
    colls = hlo.collectives(text)
    for kind, (n, b) in sorted(hlo.summary(colls).items()):
        print(f"  {kind:20s} {n:5d} ops in the program text, {b / GIB:8.3f} GiB")
    by_kind: dict[str, list] = {}
    for c in colls:
        by_kind.setdefault(c.kind, []).append(c)
    for kind, cs in sorted(by_kind.items()):
        cs.sort(key=lambda c: -c.bytes)
        print(f"largest {kind}:")
        for c in cs[:6]:
            dt, dims = c.largest
            print(f"    {dt}{list(dims)}  {c.bytes / 2**20:.1f} MiB  in {c.computation}")
    flops = compiled.cost_analysis()
    if isinstance(flops, list):
        flops = flops[0]
    if flops and "flops" in flops:
        print(f"cost_analysis flops per chip: {flops['flops'] / 1e12:.1f} TFLOP")
    np.set_printoptions(linewidth=120)


if __name__ == "__main__":
    main()
