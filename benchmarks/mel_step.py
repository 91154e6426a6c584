"""Wall time of one MEL step versus one plain GRPO step, broken down by phase.

Both steps use the run ``meljax.trainer.run.build_run`` assembles for ``meljax train`` and
its phases (``run.rollout``, ``run.meta``, ``run.update``), from a config file (default: the CPU demo,
SmolLM2-135M-Instruct on single-digit additions, 4 questions x G=4):

* GRPO step = rollout + reward + update (with the trainer's tiny all-padding NLL batch);
* MEL step  = rollout + reward + meta (pairs, analysis pass, filters, replay pass, NLL batch,
  log) + update (with the NLL batch).

Both steps start from the same parameters (the update does not donate them and its result is
discarded) and use the same batch of questions and PRNG keys per repetition, so their rollouts
are identical and the difference is MEL's own work. The first repetition compiles and is
reported separately; the table shows medians over the following ones.

``--mixed K`` controls how many groups the MEL pipeline sees as mixed, independent of what the
model happened to get right: the first K groups get rewards ``[1, 0, 1, 0, ...]`` (the most pairs
a group can give), the others all-incorrect. The real replay answers are still verified against
the real answers. ``--mixed -1`` uses the real rewards.

Usage::

    .venv/bin/python benchmarks/mel_step.py                       # demo settings, K = N/2
    .venv/bin/python benchmarks/mel_step.py --repeats 5 --set mel.analysis_max_new_tokens=48
    .venv/bin/python benchmarks/mel_step.py --json /tmp/mel_step.json
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from meljax.rewards import is_correct
from meljax.trainer.run import build_run

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "..", "configs", "demo.py")


def load_config(path: str, overrides: list[str]):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for item in overrides:
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        cfg[section][name] = value
    return cfg


def forced_rewards(real: np.ndarray, mixed: int) -> np.ndarray:
    """First ``mixed`` groups alternate correct/incorrect, the rest all incorrect."""
    if mixed < 0:
        return real
    r = np.zeros_like(real)
    r[:mixed, 0::2] = 1.0
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config override, e.g. mel.analysis_max_new_tokens=48 (repeatable)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions after warm-up")
    ap.add_argument(
        "--mixed",
        type=int,
        default=None,
        help="groups the MEL pipeline sees as mixed (default: half; -1: real rewards)",
    )
    ap.add_argument(
        "--nll_bucketed",
        action="store_true",
        help="bucket the NLL batch to the kept rows (default: the config's mel.nll_bucketed)",
    )
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, args.set)
    n_q, g = cfg.rollout.num_questions, cfg.rollout.group_size
    mixed = n_q // 2 if args.mixed is None else args.mixed
    if args.nll_bucketed:
        cfg.mel.nll_bucketed = True
    t0 = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="mel_step_bench_")
    cfg.mel.enabled = True  # the run has the MEL pipeline; the GRPO step does not call it
    # the update does not donate: GRPO and MEL update from the same state
    run = build_run(cfg, workdir, donate=False)
    state, data_iter = run.state, run.data_iter
    weights = run.policy.prepare(state.params)  # state never changes here: prepared once
    setup_s = time.perf_counter() - t0
    print(f"setup {setup_s:.1f}s; devices {jax.devices()}", flush=True)

    def update(mel_batch, policy_batch):
        t = time.perf_counter()
        new_state, metrics = run.update(state, policy_batch, mel_batch)
        jax.block_until_ready((new_state.params, metrics))
        return time.perf_counter() - t

    def rollout(problems, key):
        return run.rollout(weights, problems, key)

    runs = []
    base_key = jax.random.key(cfg.seed)
    for rep in range(args.repeats + 1):
        problems = next(data_iter)
        k_rollout, k_meta = jax.random.split(jax.random.fold_in(base_key, rep + 1))
        # GRPO step
        ro = rollout(problems, k_rollout)
        grpo = {"rollout": ro.timings["rollout"], "reward": ro.timings["reward"]}
        grpo["update"] = update(run.no_mel, ro.batch)
        # MEL step (same params, questions and keys -> the same rollouts)
        ro = rollout(problems, k_rollout)
        mel = {"rollout": ro.timings["rollout"], "reward": ro.timings["reward"]}
        rewards = forced_rewards(ro.rewards, mixed)
        meta = run.meta(weights, rep + 1, problems, rewards, ro.texts, k_meta)
        mel["analysis"] = meta.timings["analysis_s"]
        mel["replay"] = meta.timings["replay_s"]
        mel["meta_other"] = meta.timings["total_s"] - mel["analysis"] - mel["replay"]
        mel["update"] = update(meta.batch, ro.batch)
        for d in (grpo, mel):
            d["step"] = sum(d.values())
        c = meta.counts
        rep_result = {
            "rep": rep,
            "grpo": grpo,
            "mel": mel,
            "ratio": mel["step"] / grpo["step"],
            "real_mixed_groups": int(
                np.sum(is_correct(ro.rewards).any(1) & ~is_correct(ro.rewards).all(1))
            ),
            "rollout_tokens": int(ro.metrics()["rollout_tokens"]),
            "policy_batch_shape": list(np.shape(ro.batch.seq.tokens)),
            "nll_batch_shape": list(np.shape(meta.batch.tokens)),
            "counts": {
                k: getattr(c, k)
                for k in (
                    "mixed_groups",
                    "pairs",
                    "generated",
                    "empty",
                    "truncated",
                    "leak",
                    "malformed",
                    "replayed",
                    "kept",
                    "shortened",
                )
            },
            "analysis_tokens": int(sum(r["num_tokens"] for r in meta.records)),
            "analysis_prompt_tokens": int(sum(r["prompt_tokens"] for r in meta.records)),
        }
        runs.append(rep_result)
        tag = "warm-up (compiles)" if rep == 0 else f"rep {rep}"
        print(
            f"{tag}: GRPO {grpo['step']:.2f}s  MEL {mel['step']:.2f}s  "
            f"ratio {rep_result['ratio']:.2f}  counts {rep_result['counts']}",
            flush=True,
        )
    run.close()

    timed = runs[1:] or runs
    phases = ["rollout", "reward", "analysis", "replay", "meta_other", "update", "step"]

    def med(kind, phase):
        vals = [r[kind].get(phase) for r in timed if phase in r[kind]]
        return statistics.median(vals) if vals else None

    summary = {k: {p: med(k, p) for p in phases if med(k, p) is not None} for k in ("grpo", "mel")}
    ratio = summary["mel"]["step"] / summary["grpo"]["step"]
    print(f"\nconfig {os.path.relpath(args.config)} {' '.join(args.set)}")
    print(
        f"{n_q} questions x G={g}; rollout max_new {cfg.rollout.max_new_tokens}; analysis "
        f"prompt <= {cfg.mel.analysis_max_prompt_tokens}, new <= "
        f"{cfg.mel.analysis_max_new_tokens}; replay new <= {cfg.mel.replay_max_new_tokens}; "
        f"groups seen as mixed by MEL: {'real' if mixed < 0 else mixed}/{n_q}"
    )
    print(f"median over {len(timed)} repetition(s), seconds:")
    print(f"{'phase':<12}{'GRPO':>9}{'MEL':>9}")
    for p in phases:
        a, b = summary["grpo"].get(p), summary["mel"].get(p)
        fa = f"{a:9.2f}" if a is not None else f"{'-':>9}"
        fb = f"{b:9.2f}" if b is not None else f"{'-':>9}"
        print(f"{p:<12}{fa}{fb}")
    print(f"MEL / GRPO step time: {ratio:.2f}x (target <= 1.6x)")
    result = {
        "config": args.config,
        "overrides": args.set,
        "mixed": mixed,
        "nll_bucketed": args.nll_bucketed,
        "setup_s": setup_s,
        "summary": summary,
        "ratio": ratio,
        "runs": runs,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
