"""Cost of one decode step of the rollout engine against the cache length it reads (CPU).

A pool of ``--slots`` live slots of the demo model's shapes (SmolLM2-135M, random float32
weights: the cost depends on shapes only) runs :func:`meljax.sampling.slots.decode_segment`
of ``--segment_steps`` steps. For each length ``L`` in ``--lengths`` the pool's whole cache
is ``L`` slots long, so a step reads exactly ``L`` cached positions per slot: what a step
would cost if every slot read only a filled part of ``L`` slots (a per-slot ragged
attention at zero overhead). ``--cache C`` adds, for each ``L < C``, a pool of a ``C``-slot
cache that attends to its first ``L`` slots only (the engine's length buckets). Calls
alternate over ``--rounds``; each figure is the median of its calls in milliseconds per
decode step (compilation excluded), with the least-squares line
``step = fixed + per_slot * L`` over the whole-cache pools.

With ``benchmarks/rollout.py``'s mean filled length per useful token (``--filled``), the line
gives what reading only the filled part would save in the engine's step, and so the most
useful tokens/s any engine could make on that workload: every slot live, every step reading
only the filled part, nothing else (prefill, scheduling) counted (README, "Measured figures").

  python benchmarks/decode_cost.py --lengths 64,256,640 --cache 640
  python benchmarks/decode_cost.py --lengths 32,288,640 --filled 278
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meljax.models.config import ModelConfig
from meljax.models.transformer import Transformer
from meljax.plan.architectures import BUILTIN
from meljax.sampling import slots
from meljax.sampling.engine import ContinuousEngine


def live_pool(engine, n_slots: int, cache_len: int, pos: np.ndarray) -> slots.SlotState:
    """``n_slots`` live slots at positions ``pos``, none ending within a segment."""
    state = slots.init_slots(
        graphdef=engine.graphdef,
        slots=n_slots,
        cache_len=cache_len,
        max_new=4096,
        cache_dtype=None,
        mesh=None,
        split=engine.split,
    )
    return dataclasses.replace(
        state,
        done=jnp.zeros(n_slots, bool),
        pos=jnp.asarray(pos, jnp.int32),
        max_new=jnp.full(n_slots, 4096, jnp.int32),
        temperature=jnp.ones(n_slots),
        top_p=jnp.ones(n_slots),
        top_k=jnp.zeros(n_slots, jnp.int32),
        last_token=jnp.full(n_slots, 5, jnp.int32),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--lengths", default="64,256,640", help="whole-cache lengths to time")
    ap.add_argument("--cache", type=int, default=0, help="also attend to L of a C-slot cache")
    ap.add_argument("--segment_steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--segment_buffer",
        default="auto",
        choices=("auto", "0", "1"),
        help="1: the read-only cache + segment buffer of TPU / GPU; 0: the cache written in the "
        "loop (the CPU default); auto: the engine's default here",
    )
    ap.add_argument(
        "--filled",
        type=float,
        default=0.0,
        help="a mean filled length per useful token (benchmarks/rollout.py prints it): print "
        "the most tokens/s any attention that reads only the filled part could reach",
    )
    args = ap.parse_args()
    lengths = sorted(int(x) for x in args.lengths.split(","))
    # every slot's segment fits the shortest cache: positions in [first, 2 * first)
    first = (lengths[0] - args.segment_steps) // 2
    if first < 1:
        raise SystemExit(
            f"--lengths: {lengths[0]} leaves no room for a {args.segment_steps}-step segment"
        )

    cfg = ModelConfig.from_hf_dict(BUILTIN["smollm2-135m"], dtype="float32")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    buffer = None if args.segment_buffer == "auto" else args.segment_buffer == "1"
    engine = ContinuousEngine(
        graphdef, stop_token_ids=[0], pad_id=0, max_slots=args.slots, segment_buffer=buffer
    )
    weights = engine.prepare(params)
    stop_ids, pad_id = jnp.asarray([0], jnp.int32), jnp.asarray(0, jnp.int32)
    pos = np.random.default_rng(0).integers(first, 2 * first, args.slots)
    # (label, whole cache length, attended length)
    cases = [(f"cache {n}", n, n) for n in lengths]
    cases += [(f"{n} of {args.cache}", args.cache, n) for n in lengths if n < args.cache]
    pools = {c: live_pool(engine, args.slots, c[1], pos) for c in cases}

    def step_ms(case) -> float:
        state = jax.block_until_ready(jax.tree.map(jnp.copy, pools[case]))  # it is donated
        t = time.perf_counter()
        out, ran = slots.decode_segment(
            weights,
            state,
            stop_ids,
            pad_id,
            graphdef=graphdef,
            kv_len=case[2],
            num_steps=args.segment_steps,
            split=engine.split,
            segment_buffer=engine.segment_buffer,
        )
        jax.block_until_ready(out.tokens)
        return (time.perf_counter() - t) / int(ran) * 1e3

    for case in cases:  # compile
        step_ms(case)
    times = {c: [] for c in cases}
    for _ in range(args.rounds):
        for case in cases:
            times[case].append(step_ms(case))
    print(
        f"{args.slots} live slots, SmolLM2-135M shapes f32, {args.segment_steps}-step segments, "
        f"segment buffer {engine.segment_buffer}"
    )
    for case in cases:
        calls = ", ".join(f"{x:.0f}" for x in times[case])
        ms = np.median(times[case])
        print(
            f"  {case[0]:>14}: {ms:7.1f} ms/step = {args.slots / ms * 1e3:5.1f} tokens/s with "
            f"every slot live  (calls {calls})"
        )
    if len(lengths) > 1:
        med = [np.median(times[(f"cache {n}", n, n)]) for n in lengths]
        per_slot, fixed = np.polyfit(lengths, med, 1)
        print(f"  line: step = {fixed:.1f} ms + {per_slot:.3f} ms x cache length")
        if args.filled:
            ms = fixed + per_slot * args.filled
            print(
                f"  reading only a mean filled {args.filled:.0f} slots, with every slot live: "
                f"{ms:.1f} ms/step, at most {args.slots / ms * 1e3:.1f} useful tokens/s; "
                f"attention free (the fixed part only): at most {args.slots / fixed * 1e3:.1f}"
            )


if __name__ == "__main__":
    main()
