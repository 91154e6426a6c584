"""Yield of the MEL analysis formats on the demo task, with the untrained demo model.

For each of ``--steps`` training batches (the same questions and rollout keys as step 1, 2, ...
of ``meljax train`` with the demo config), samples the rollouts once and then runs the
meta-experience pipeline once per variant on the same rollouts and the same meta key. Prints
per variant: analyses generated, kept, drops by reason, and the share of analysis tokens that
ended in kept lessons; writes every record to ``--out`` (JSONL, one line per analysis).

    .venv/bin/python experiments/mel_yield.py --steps 4 \\
        --variant paper,96 --variant compact,64 --out /tmp/mel_yield.jsonl

A variant is ``FORMAT,MAX_NEW_TOKENS[,TEMPLATE_FILE[,REPLY_PREFIX]]``, optionally followed by
``;FIELD=VALUE`` pairs of other ``mel`` settings (``compact,40;replay_temperature=0``). The
weights are never updated, so this
measures what the starting policy writes; a training run's later steps sample from updated
weights.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import tempfile
import time

import jax

import meljax
from meljax.meta import MetaConfig, MetaExperiencePipeline
from meljax.meta.filters import FILTER_REASONS
from meljax.trainer.run import build_run


def demo_config():
    """``meljax/configs/demo.py``'s config (configs are files, not a package)."""
    path = os.path.join(os.path.dirname(meljax.__file__), "configs", "demo.py")
    spec = importlib.util.spec_from_file_location("demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_variant(spec: str) -> tuple[str, dict, str | None]:
    """``FORMAT,MAX_NEW_TOKENS[,TEMPLATE_FILE[,REPLY_PREFIX]][;FIELD=VALUE...]`` -> (name,
    overrides, prefix); a VALUE takes the type of the field's default."""
    head, *extra = spec.split(";")
    parts = head.split(",")
    overrides = {"analysis_format": parts[0], "analysis_max_new_tokens": int(parts[1])}
    if len(parts) > 2 and parts[2]:
        with open(parts[2], encoding="utf-8") as f:
            overrides["analysis_template"] = f.read()
    prefix = parts[3] if len(parts) > 3 else None
    defaults = {f.name: f.default for f in dataclasses.fields(MetaConfig)}
    for item in extra:
        field, value = item.split("=", 1)
        kind = type(defaults[field])
        overrides[field] = value.lower() in ("1", "true") if kind is bool else kind(value)
    return spec, overrides, prefix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--out", default="/tmp/mel_yield.jsonl")
    args = ap.parse_args()

    cfg = demo_config()
    run = build_run(cfg, tempfile.mkdtemp(prefix="mel_yield_"))
    s, policy, verifier, data_iter = run.settings, run.policy, run.verifier, run.data_iter
    weights = policy.prepare(run.state.params)
    variants = [parse_variant(v) for v in args.variant]
    pipelines = {}
    for name, over, prefix in variants:
        pipeline = MetaExperiencePipeline(
            policy=policy,
            verifier=verifier,
            config=dataclasses.replace(s.mel, **over),
        )
        if prefix is not None:
            pipeline.format = dataclasses.replace(pipeline.format, reply_prefix=prefix)
        pipelines[name] = pipeline
    base_key = jax.random.key(cfg.seed)
    totals = {name: collections.Counter() for name, _, _ in variants}
    with open(args.out, "w", encoding="utf-8") as out:
        for step in range(1, args.steps + 1):
            k_rollout, k_meta = jax.random.split(jax.random.fold_in(base_key, step))
            problems = next(data_iter)
            ro = run.rollout(weights, problems, k_rollout)
            for name, pipeline in pipelines.items():
                t0 = time.perf_counter()
                meta = pipeline.run(weights, step, problems, ro.texts, ro.rewards, 4, k_meta)
                c = meta.counts
                t = totals[name]
                t["steps"] += 1
                t["steps_with_kept"] += int(c.kept > 0)
                t["seconds"] += time.perf_counter() - t0
                for key in ("generated", "kept", "replay_failed", "analysis_tokens", "kept_tokens"):
                    t[key] += getattr(c, key)
                for reason in FILTER_REASONS:
                    t[reason] += getattr(c, reason)
                for rec in meta.records:
                    out.write(json.dumps({"variant": name, **rec}) + "\n")
                out.flush()
                print(f"step {step} {name}: {dict(c.__dict__)}", flush=True)
    print(
        "\nvariant | generated | kept | yield | empty/truncated/malformed/leak/copied/replay_failed"
        " | kept token share | steps with kept | s/step"
    )
    for name, t in totals.items():
        share = t["kept_tokens"] / max(t["analysis_tokens"], 1)
        drops = "/".join(str(t[r]) for r in (*FILTER_REASONS, "replay_failed"))
        print(
            f"{name} | {t['generated']} | {t['kept']} | {t['kept'] / max(t['generated'], 1):.2f}"
            f" | {drops} | {share:.2f} | {t['steps_with_kept']}/{t['steps']}"
            f" | {t['seconds'] / t['steps']:.1f}"
        )


if __name__ == "__main__":
    main()
