"""Sampler throughput: meljax (JAX) vs Hugging Face ``generate`` (torch).

meljax runs twice: ``engine`` (the continuous-batching engine every caller uses, one slot per
row) and ``jax`` (the static-batch reference sampler it replaced), so old and new are compared
in the same run.

Model: the SmolLM2-135M-Instruct demo model, float32, CPU. Both engines get the same weights
(``demo_model_dir()``), the same prompts (GSM8K test questions in the chat template, cut to
exactly ``--prompt_len`` tokens from the left) and generate exactly ``--new_tokens`` tokens per
row (stop tokens disabled on both sides: ``stop_token_ids=[]`` / ``eos_token_id=None`` and
``min_new_tokens``).

Scenarios:
  grouped: ``--num_prompts`` prompts x ``--group`` samples (batch 16 by default), temperature 1;
  greedy1: one prompt, batch 1, greedy.

Each engine runs in its own child process (so each one's peak RSS is its own): ``--runs``
timed calls after one warm-up call; ``--rounds`` child processes per engine, alternating
between engines. Figures per scenario: new tokens/s (median call and best call; the machine is
shared, and the best call is the least disturbed one), median wall time per call, time to
first token (a call with one new token: prefill + first sample), compile time (first call
minus a steady call; JAX only), peak RSS of the process.

  python benchmarks/sampler.py                   # all engines, both scenarios
  python benchmarks/sampler.py --engines=jax     # one engine
  python benchmarks/sampler.py --data=DIR        # DIR/gsm8k/test.jsonl (default ../shared/data)

Without the GSM8K file the benchmark says so and stops (exit status 0): filler prompts would
not be the measured workload.
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
# The project's data folder sits next to the repository (see shared/data/README.md).
DEFAULT_DATA = REPO_ROOT / ".." / "shared" / "data"
GSM8K_FILE = Path("gsm8k") / "test.jsonl"


def gsm8k_file(data: str | os.PathLike) -> Path | None:
    """``DATA/gsm8k/test.jsonl`` if it exists (``data`` may also name the file itself)."""
    path = Path(data)
    if path.is_dir():
        path = path / GSM8K_FILE
    return path if path.is_file() else None


def build_prompts(tokenizer, n: int, length: int, data: str | os.PathLike) -> list[list[int]]:
    """``n`` chat prompts of exactly ``length`` tokens (GSM8K questions, left-cut)."""
    from meljax.data import load_problems

    path = gsm8k_file(data)
    if path is None:
        raise FileNotFoundError(f"no GSM8K test file under {data}")
    texts = [p.question for p in load_problems(str(path), "gsm8k", limit=n)]
    if len(texts) < n:
        raise ValueError(f"{path} holds {len(texts)} questions, fewer than {n}")
    out = []
    for text in texts:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        while len(ids) < length:  # short question: repeat it in front (keeps the chat tail)
            ids = ids[: length - len(ids)] + ids
        out.append(list(ids[-length:]))
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_jax(args, scenarios, engine: bool = False) -> dict:
    """The static reference sampler, or (``engine``) the continuous engine with one slot per
    row and segments of ``--segment_steps``."""
    import jax
    from flax import nnx

    from meljax.models import demo_model_dir, from_pretrained, load_tokenizer
    from meljax.sampling import ContinuousEngine, Request, SamplingParams
    from tests.reference_sampler import Sampler

    path = demo_model_dir()
    model = from_pretrained(path, dtype="float32")
    tok = load_tokenizer(path)
    graphdef, params = nnx.split(model)
    # One new-token bucket for 1 and N new tokens, so the TTFT call reuses the compiled program.
    sampler = Sampler(
        graphdef, stop_token_ids=[], pad_id=tok.pad_token_id, new_token_buckets=(args.new_tokens,)
    )
    results = {}
    for name, n_prompts, group, temp in scenarios:
        prompts = build_prompts(tok, n_prompts, args.prompt_len, args.data)
        sp = SamplingParams(args.new_tokens, temperature=temp, num_samples=group)
        eng = ContinuousEngine(
            graphdef,
            stop_token_ids=[],
            pad_id=tok.pad_token_id,
            max_slots=n_prompts * group,
            segment_steps=args.segment_steps,
        )
        weights = eng.prepare(params)

        def call(sp=sp, prompts=prompts, seed=0, eng=eng, weights=weights):
            t = time.perf_counter()
            if engine:
                out = eng.generate(
                    weights, [Request(tuple(p), sp) for p in prompts], jax.random.key(seed)
                )
                made = sum(len(x.tokens) for group in out for x in group)
            else:
                res = sampler.sample(params, prompts, sp, jax.random.key(seed))
                made = int(res.mask.sum())
            dt = time.perf_counter() - t
            assert made == len(prompts) * sp.num_samples * sp.max_new_tokens
            return dt

        first = call()
        times = [call(seed=i + 1) for i in range(args.runs)]
        one = SamplingParams(1, temperature=temp, num_samples=group)
        call(sp=one)
        ttft = [call(sp=one, seed=i) for i in range(args.runs)]
        med = statistics.median(times)
        rows = n_prompts * group
        results[name] = {
            "tokens_per_s": rows * args.new_tokens / med,
            "call_s": med,
            "call_s_all": times,
            "ttft_s": statistics.median(ttft),
            "compile_s": first - med,
        }
    results["peak_rss_mib"] = peak_rss_mib()
    return results


def run_hf(args, scenarios) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from meljax.models import demo_model_dir, load_tokenizer

    torch.set_num_threads(args.torch_threads)
    path = demo_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = load_tokenizer(path)
    results = {}
    for name, n_prompts, group, temp in scenarios:
        prompts = torch.tensor(build_prompts(tok, n_prompts, args.prompt_len, args.data))
        sample = temp > 0

        def call(new_tokens, seed=0, prompts=prompts, group=group, sample=sample, temp=temp):
            torch.manual_seed(seed)
            kw = dict(do_sample=True, temperature=temp, top_p=1.0, top_k=0) if sample else {}
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    num_return_sequences=group,
                    eos_token_id=None,
                    pad_token_id=tok.pad_token_id,
                    **kw,
                )
            dt = time.perf_counter() - t
            assert out.shape == (len(prompts) * group, args.prompt_len + new_tokens), out.shape
            return dt

        call(args.new_tokens)
        times = [call(args.new_tokens, seed=i + 1) for i in range(args.runs)]
        ttft = [call(1, seed=i) for i in range(args.runs)]
        med = statistics.median(times)
        results[name] = {
            "tokens_per_s": n_prompts * group * args.new_tokens / med,
            "call_s": med,
            "call_s_all": times,
            "ttft_s": statistics.median(ttft),
        }
    results["peak_rss_mib"] = peak_rss_mib()
    return results


def scenarios_of(args):
    return [
        ("grouped", args.num_prompts, args.group, 1.0),
        ("greedy1", 1, 1, 0.0),
    ]


def child(args) -> None:
    if args.child == "hf":
        out = run_hf(args, scenarios_of(args))
    else:
        out = run_jax(args, scenarios_of(args), engine=args.child == "engine")
    print("RESULT " + json.dumps(out), flush=True)


def _merge(rounds: list[dict]) -> dict:
    """Per-scenario figures over several child runs: all call times pooled."""
    out = {"peak_rss_mib": max(r["peak_rss_mib"] for r in rounds)}
    for name in (k for k in rounds[0] if k != "peak_rss_mib"):
        calls = [t for r in rounds for t in r[name]["call_s_all"]]
        rows_tokens = rounds[0][name]["tokens_per_s"] * rounds[0][name]["call_s"]
        merged = {
            "call_s_all": calls,
            "call_s": statistics.median(calls),
            "call_s_min": min(calls),
            "ttft_s": statistics.median(r[name]["ttft_s"] for r in rounds),
        }
        merged["tokens_per_s"] = rows_tokens / merged["call_s"]
        merged["tokens_per_s_best"] = rows_tokens / merged["call_s_min"]
        if "compile_s" in rounds[0][name]:
            merged["compile_s"] = statistics.median(r[name]["compile_s"] for r in rounds)
        out[name] = merged
    return out


def parent(args) -> None:
    common = [
        f"--runs={args.runs}",
        f"--new_tokens={args.new_tokens}",
        f"--prompt_len={args.prompt_len}",
        f"--num_prompts={args.num_prompts}",
        f"--group={args.group}",
        f"--torch_threads={args.torch_threads}",
        f"--data={args.data}",
        f"--segment_steps={args.segment_steps}",
    ]
    raw, loads = run_children_alternating(__file__, args.engines.split(","), common, args.rounds)
    results = {e: _merge(r) for e, r in raw.items()}

    print(
        f"\nSmolLM2-135M f32 CPU, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"{args.rounds} round(s) x {args.runs} timed calls per engine (torch threads: "
        f"{args.torch_threads}, cpus: {os.cpu_count()}, 1-min load avg after each child: "
        f"{', '.join(f'{x:.1f}' for x in loads)})"
    )
    header = f"{'scenario':<9} {'engine':<6} {'tok/s med':>9} {'tok/s best':>10} {'call s':>7} "
    print(header + f"{'TTFT s':>7} {'compile s':>9} {'peak RSS MiB':>12}")
    for name, n_prompts, group, _ in scenarios_of(args):
        for engine, r in results.items():
            x = r[name]
            comp = f"{x['compile_s']:9.1f}" if "compile_s" in x else f"{'-':>9}"
            print(
                f"{name:<9} {engine:<6} {x['tokens_per_s']:9.1f} {x['tokens_per_s_best']:10.1f} "
                f"{x['call_s']:7.2f} {x['ttft_s']:7.3f} {comp} {r['peak_rss_mib']:12.0f}"
            )
        for a, c in (("jax", "hf"), ("engine", "hf"), ("engine", "jax")):
            if {a, c} <= results.keys():
                j, h = results[a][name], results[c][name]
                print(
                    f"{name:<9} ratio {a}/{c} tokens/s: median "
                    f"{j['tokens_per_s'] / h['tokens_per_s']:.2f}x, best "
                    f"{j['tokens_per_s_best'] / h['tokens_per_s_best']:.2f}x"
                    f"  (batch {n_prompts * group})"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw": raw, "merged": results}, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--engines", default="engine,jax,hf", help="comma list of engine, jax (static), hf"
    )
    ap.add_argument("--segment_steps", type=int, default=16, help="engine: steps per segment")
    ap.add_argument("--runs", type=int, default=3, help="timed calls per child process")
    ap.add_argument("--rounds", type=int, default=1, help="child processes per engine")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--num_prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--torch_threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="data folder holding gsm8k/test.jsonl (or that file); default ../shared/data "
        "next to the repository",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if gsm8k_file(args.data) is None:
        print(
            f"sampler benchmark skipped: no GSM8K questions at {Path(args.data) / GSM8K_FILE} "
            f"(pass --data=FOLDER holding gsm8k/test.jsonl)",
            file=sys.stderr,
        )
        return
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
