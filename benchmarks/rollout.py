"""Rollout throughput on a realistic workload: the continuous engine vs the static sampler vs HF.

SmolLM2-135M-Instruct (the demo model), float32, CPU, real stop tokens (the policy's: EOS and
the chat template's end of turn): ``--questions`` GSM8K test questions (``--data``, default
``../shared/data`` next to the repository) in the chat template with the default instruction,
``--group`` samples each at temperature 1.0, at most ``--max_new`` new tokens.

Engines (each in its own child process, so each one's peak RSS is its own; rounds alternate):

- ``engine``: :class:`meljax.sampling.ContinuousEngine` with ``--slots`` decode slots;
- ``static``: the static-batch reference sampler, calls of ``--slots`` rows (``--slots /
  --group`` questions each, longest prompts first, as its engine adapter batched them): the
  same KV-cache rows as the engine;
- ``hf``: transformers ``generate`` (torch, ``--torch_threads`` threads), one question x G per
  call, on the first ``--hf_questions`` questions (it is slow);
- ``api``: what a user calls: :func:`meljax.sampling.generate` on the model
  ``meljax.models.from_pretrained(resolve_model_path("demo"))``, ``--runs`` calls in one
  process (seeds 0, 1, ...; ``--api_slots`` decode slots, 0: one per sample), each call timed
  with its compile time apart (the first call compiles; later calls of the same workload should
  not).

Workload: ``--data`` is a folder holding ``gsm8k/test.jsonl`` or any problems file
``meljax.data.load_problems`` reads (e.g. ``math500/test.jsonl``); ``--prompt instruction``
renders the chat template with the default instruction (the training prompt), ``plain`` the
bare question in the chat template (``generate()``'s default). Every engine gets the same
prompt ids.

Figure: useful new tokens/s = generated tokens up to and including each sample's stop token,
over the wall time of the run minus the time JAX spent compiling in it (traced, lowered and
compiled, summed from ``jax.monitoring`` events; ``--warmup`` runs the workload once before
instead, which doubles a long benchmark on a shared machine). Also slot utilisation (useful
tokens / slot-steps; for the static sampler rows x decode steps of each call) and peak RSS.

  python benchmarks/rollout.py                       # all engines
  python benchmarks/rollout.py --engines=engine,static --runs=1
  python benchmarks/rollout.py --engines=api,hf --runs=3 --api_slots=0 --prompt=plain \
      --data=../shared/data/math500/test.jsonl --questions=8 --max_new=256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from common import run_children_alternating

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / ".." / "shared" / "data"
GSM8K_FILE = Path("gsm8k") / "test.jsonl"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


COMPILE_S = [0.0]  # seconds JAX spent tracing, lowering and compiling in this process


def count_compile_time() -> None:
    import jax

    def listen(event: str, seconds: float, **_) -> None:
        if event.startswith("/jax/core/compile/") or event.endswith("backend_compile_duration"):
            COMPILE_S[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)


def timed(fn, *args):
    """``(seconds excluding compilation, compile seconds, result)`` of ``fn(*args)``."""
    before = COMPILE_S[0]
    t = time.perf_counter()
    out = fn(*args)
    wall = time.perf_counter() - t
    compiled = COMPILE_S[0] - before
    return wall - compiled, compiled, out


def load_questions(args) -> list[str]:
    """The first ``--questions`` questions of ``--data`` (a folder: its GSM8K test file)."""
    from meljax.data import load_problems

    path = Path(args.data)
    if path.is_dir():
        path = path / GSM8K_FILE
    return [p.question for p in load_problems(str(path), limit=args.questions)]


def prompt_config(args):
    """The prompt rendering of ``--prompt`` (the same for every engine)."""
    from meljax.data.prompts import PromptConfig

    return PromptConfig() if args.prompt == "instruction" else PromptConfig.plain(chat=True)


def load_policy(args):
    """The demo model's policy and the prompts (token ids) it renders."""
    from flax import nnx

    from meljax.models import demo_model_dir, from_pretrained, load_tokenizer
    from meljax.sampling.policy import Policy

    questions = load_questions(args)
    model_dir = demo_model_dir()
    model = from_pretrained(model_dir, dtype="float32")
    tok = load_tokenizer(model_dir)
    graphdef, params = nnx.split(model)
    policy = Policy.build(graphdef, tok, prompt_config(args), max_slots=args.slots)
    policy.engine.segment_steps = args.segment_steps
    if args.kv_buckets:  # attended-length buckets of the engine's segments
        policy.engine.kv_buckets = tuple(int(x) for x in args.kv_buckets.split(","))
    policy.engine.shrink_tail = bool(args.shrink_tail)
    return policy, graphdef, params, [policy.encode(q) for q in questions], tok


def run_engine(args) -> dict:
    import jax

    from meljax.sampling import Request, SamplingParams

    policy, _, params, prompts, _ = load_policy(args)
    sp = SamplingParams(args.max_new, temperature=1.0, num_samples=args.group)
    reqs = [Request(tuple(p), sp) for p in prompts]
    weights = policy.engine.prepare(params)

    def call(seed):
        """(useful tokens, mean filled cache slots a useful token's step reads)"""
        out = policy.engine.generate(weights, reqs, jax.random.key(seed))
        lengths = [(len(p), len(x.tokens)) for p, g in zip(prompts, out, strict=True) for x in g]
        made = sum(n for _, n in lengths)
        # token j of a sample attends to its prompt and its j earlier tokens
        return made, sum(n * p + n * (n - 1) / 2 for p, n in lengths) / max(made, 1)

    if args.warmup:
        call(100)
    runs = [timed(call, i) for i in range(args.runs)]
    stats = policy.engine.last_stats
    return {
        "runs": [{"seconds": dt, "compile_s": c, "tokens": n[0]} for dt, c, n in runs],
        "slot_utilisation": stats.slot_utilisation,
        "slots": stats.slots,
        "cache_len": stats.cache_len,
        "segments": stats.segments,
        "kv_lens": stats.kv_lens,
        "pools": stats.pools,
        # the mean cache length a decode step of a useful token must read (what a per-slot
        # ragged attention would read) vs what the engine's segments read
        "mean_filled": runs[-1][2][1],
        "mean_attended": sum(k * n for k, n in stats.kv_lens.items()) / max(stats.segments, 1),
        "peak_rss_mib": peak_rss_mib(),
    }


def run_static(args) -> dict:
    import jax
    import numpy as np

    from meljax.sampling import SamplingParams
    from tests.reference_sampler import Sampler

    policy, graphdef, params, prompts, _ = load_policy(args)
    sampler = Sampler(graphdef, stop_token_ids=policy.stop_ids, pad_id=policy.pad_id)
    sp = SamplingParams(args.max_new, temperature=1.0, num_samples=args.group)
    per_call = max(1, args.slots // args.group)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    calls = [order[i : i + per_call] for i in range(0, len(order), per_call)]

    def call(seed):
        made = row_steps = 0
        for c, members in enumerate(calls):
            res = sampler.sample(
                params, [prompts[i] for i in members], sp, jax.random.key(seed * 1000 + c)
            )
            made += int(res.lengths.sum())
            # the decode loop ran until the call's longest row ended, for every row
            row_steps += len(res) * int(np.max(res.lengths))
        return made, row_steps

    if args.warmup:
        call(100)
    runs = [timed(call, i) for i in range(args.runs)]
    return {
        "runs": [{"seconds": dt, "compile_s": c, "tokens": n[0]} for dt, c, n in runs],
        "slot_utilisation": runs[-1][2][0] / runs[-1][2][1],
        "calls": len(calls),
        "peak_rss_mib": peak_rss_mib(),
    }


def run_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from meljax.models import demo_model_dir

    torch.set_num_threads(args.torch_threads)
    policy, _, _, prompts, tok = load_policy(args)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32).eval()
    stops = list(policy.stop_ids)
    warm = torch.tensor([prompts[0]])
    with torch.no_grad():  # warm-up call (first-call set-up is not throughput)
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=8)
    runs = []
    for r in range(args.hf_runs):
        torch.manual_seed(r)
        t = time.perf_counter()
        made = 0
        for prompt in prompts[: args.hf_questions]:
            x = torch.tensor([prompt])
            with torch.no_grad():
                out = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    do_sample=True,
                    temperature=1.0,
                    top_p=1.0,
                    top_k=0,
                    max_new_tokens=args.max_new,
                    num_return_sequences=args.group,
                    eos_token_id=stops,
                    pad_token_id=policy.pad_id,
                )
            for row in out[:, len(prompt) :].tolist():
                n = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                made += n
        runs.append({"seconds": time.perf_counter() - t, "tokens": made})
    return {"runs": runs, "questions": args.hf_questions, "peak_rss_mib": peak_rss_mib()}


def engine_stats() -> list:
    """Each ``ContinuousEngine.generate`` call's ``last_stats``, appended as calls end (the
    public API builds its engine inside the call)."""
    from meljax.sampling.engine import ContinuousEngine

    seen, real = [], ContinuousEngine.generate

    def generate(self, *args, **kw):
        out = real(self, *args, **kw)
        seen.append(self.last_stats)
        return out

    ContinuousEngine.generate = generate
    return seen


def run_api(args) -> dict:
    from meljax.models import from_pretrained, load_tokenizer, resolve_model_path
    from meljax.sampling import generate

    path = resolve_model_path("demo")
    model = from_pretrained(path, dtype="float32")
    tok = load_tokenizer(path)
    questions, prompt, seen = load_questions(args), prompt_config(args), engine_stats()

    def call(seed):
        return generate(
            model,
            tok,
            questions,
            num_samples=args.group,
            max_new_tokens=args.max_new,
            temperature=1.0,
            seed=seed,
            prompt=prompt,
            max_slots=args.api_slots,
        )

    runs = []
    for i in range(args.runs):
        dt, compiled, _ = timed(call, i)
        s = seen[-1]
        runs.append(
            {
                "seconds": dt,
                "compile_s": compiled,
                "tokens": s.useful_tokens,
                "steps": s.steps,
                "ms_per_step": 1000 * dt / max(s.steps, 1),
                "slots": s.slots,
                "cache_len": s.cache_len,
                "pools": s.pools,
                "slot_utilisation": s.slot_utilisation,
                "load": os.getloadavg()[0],
            }
        )
        print(f"[api call {i}] {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    return {
        "runs": runs,
        "slot_utilisation": runs[-1]["slot_utilisation"],
        "peak_rss_mib": peak_rss_mib(),
    }


RUNNERS = {"engine": run_engine, "static": run_static, "hf": run_hf, "api": run_api}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="engine,static,hf")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max_new", type=int, default=384)
    ap.add_argument("--slots", type=int, default=64, help="engine slots = static rows per call")
    ap.add_argument("--segment_steps", type=int, default=16)
    ap.add_argument(
        "--kv_buckets", default="", help="engine: attended-length buckets (comma list; '': default)"
    )
    ap.add_argument(
        "--shrink_tail", type=int, default=1, help="engine: 0 keeps the whole pool to the end"
    )
    ap.add_argument("--runs", type=int, default=1, help="timed runs per child")
    ap.add_argument("--warmup", type=int, default=0, help="1: one untimed run first (JAX)")
    ap.add_argument("--rounds", type=int, default=1, help="child processes per engine")
    ap.add_argument("--hf_questions", type=int, default=4)
    ap.add_argument("--hf_runs", type=int, default=1, help="timed runs of the hf child")
    ap.add_argument("--api_slots", type=int, default=64, help="api: max_slots (0: one a sample)")
    ap.add_argument(
        "--prompt", default="instruction", choices=("instruction", "plain"), help="see above"
    )
    ap.add_argument("--torch_threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / GSM8K_FILE).is_file() and not data.is_file():
        print(f"rollout benchmark skipped: no {data / GSM8K_FILE}", file=sys.stderr)
        return
    if args.child:
        if args.child != "hf":
            count_compile_time()
        print("RESULT " + json.dumps(RUNNERS[args.child](args)), flush=True)
        return
    passed = [a for a in sys.argv[1:] if not a.startswith("--engines")]
    raw, loads = run_children_alternating(__file__, args.engines.split(","), passed, args.rounds)

    print(
        f"\nSmolLM2-135M f32 CPU: {args.questions} questions of {args.data} ({args.prompt} "
        f"prompts) x G={args.group}, T=1.0, "
        f"<= {args.max_new} new tokens, real stop tokens; {args.slots} slots / rows per call; "
        f"1-min load avg after each child: {', '.join(f'{x:.1f}' for x in loads)}"
    )
    print(
        f"{'engine':<7} {'useful tok/s (median)':>22} {'tokens':>8} {'run s':>7} "
        f"{'compile s':>9} {'util':>6} {'RSS MiB':>8}"
    )
    rates = {}
    for engine, rounds in raw.items():
        runs = [r for rd in rounds for r in rd["runs"]]
        rate = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        rates[engine] = rate
        util = rounds[-1].get("slot_utilisation")
        print(
            f"{engine:<7} {rate:22.1f} {runs[-1]['tokens']:8d} {runs[-1]['seconds']:7.1f} "
            f"{runs[-1].get('compile_s', 0.0):9.1f} {util if util is None else round(util, 3)!s:>6} "
            f"{max(rd['peak_rss_mib'] for rd in rounds):8.0f}"
        )
    if "engine" in raw:
        last = raw["engine"][-1]
        print(
            f"engine: mean cache slots attended per step {last['mean_attended']:.0f}; "
            f"filled part per useful token {last['mean_filled']:.0f} (what a per-slot ragged "
            f"attention would read); segments per pool size {last['pools']}"
        )
    if "api" in raw:
        print_api_calls(raw["api"])
    for a, b in (("engine", "static"), ("engine", "hf"), ("static", "hf"), ("api", "hf")):
        if a in rates and b in rates:
            print(f"{a}/{b}: {rates[a] / rates[b]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))


def print_api_calls(rounds: list[dict]) -> None:
    """One line per ``generate()`` call: wall, compile and decode time, tokens/s."""
    print(
        f"{'api call':<9} {'wall s':>7} {'compile s':>9} {'decode s':>8} {'tokens':>7} "
        f"{'tok/s decode':>12} {'tok/s wall':>10} {'ms/step':>8} {'slots x cache':>13} "
        f"{'load':>5}  pools"
    )
    for rd in rounds:
        for i, r in enumerate(rd["runs"]):
            wall = r["seconds"] + r["compile_s"]
            print(
                f"{i:<9} {wall:7.1f} {r['compile_s']:9.1f} {r['seconds']:8.1f} {r['tokens']:7d} "
                f"{r['tokens'] / r['seconds']:12.1f} {r['tokens'] / wall:10.1f} "
                f"{r['ms_per_step']:8.0f} {r['slots']:>6} x {r['cache_len']:<4} {r['load']:5.1f}"
                f"  {r['pools']}"
            )


if __name__ == "__main__":
    main()
