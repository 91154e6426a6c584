"""``evaluate``: the policy's rollouts on benchmarks (G = 1 greedy, G = k sampled), then metrics."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from meljax.evaluation.metrics import benchmark_metrics, macro_average
from meljax.evaluation.report import EvalConfig, EvalReport, ProblemRecord
from meljax.rewards import Scorer, is_correct
from meljax.rl.rollout import score_groups
from meljax.sampling import SamplingParams
from meljax.sampling.engine import Request

__all__ = ["evaluate"]


def _check_benchmarks(benchmarks: Mapping[str, Sequence[Any]]) -> None:
    if not benchmarks:
        raise ValueError("evaluate: no benchmarks given")
    for name, problems in benchmarks.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"evaluate: benchmark names must be non-empty strings, got {name!r}")
        if len(problems) == 0:
            raise ValueError(f"evaluate: benchmark {name!r} has no problems")
        for i, p in enumerate(problems):
            if not all(isinstance(getattr(p, f, None), str) for f in ("id", "question", "answer")):
                raise TypeError(
                    f"evaluate: benchmark {name!r} item {i} is not a Problem "
                    f"(needs string id, question, answer): {p!r}"
                )


def evaluate(
    policy: Any,
    weights: Any,
    verifier: Scorer,
    benchmarks: Mapping[str, Sequence[Any]],
    config: EvalConfig = EvalConfig(),
    *,
    seed: int = 0,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Pass@1 (greedy), Avg@k and Pass@k of ``policy`` with ``weights`` on benchmarks.

    Every request (each problem greedy with G = 1, and sampled with G = k) goes through ONE
    engine run; each request's key comes from ``seed`` and its index.

    Args:
      policy: a :class:`meljax.sampling.policy.Policy`: prompts, stops and sampling as in training.
      weights: the weights to evaluate, as ``policy.prepare(params)`` returns them.
      verifier: a :class:`meljax.rewards.Verifier` (``score(completions, answers)``).
      benchmarks: ``{name: problems}`` (``id``, ``question``, ``answer``); each non-empty.
      config: the passes (``every_steps``, ``benchmarks`` and ``limit`` are the trainer's).
      seed: PRNG seed of the sampled pass.
      progress: a progress bar per pass.
      meta: provenance copied into the report.
    """
    import jax
    from tqdm.auto import tqdm

    _check_benchmarks(benchmarks)
    c = config
    cut_before = getattr(policy, "prompts_cut", 0)
    records: list[ProblemRecord] = []
    prompts, answers = [], []
    for name, problems in benchmarks.items():
        for p in problems:
            ids = policy.encode(p.question, c.max_new_tokens)
            prompts.append(ids)
            answers.append(p.answer)
            records.append(ProblemRecord(name, p.id, p.question, p.answer, len(ids)))
    passes = []
    if c.greedy:
        passes.append(("greedy", SamplingParams(c.max_new_tokens, temperature=0.0)))
    if c.num_samples:
        passes.append(
            (
                "sampled",
                SamplingParams(c.max_new_tokens, c.temperature, c.top_p, c.top_k, c.num_samples),
            )
        )
    # ALL requests (greedy G=1 and sampled G=k) in one engine run: the slots of finished
    # greedy answers are refilled with sampled ones and vice versa.
    requests = [Request(tuple(ids), sampling) for _, sampling in passes for ids in prompts]
    t0 = time.perf_counter()
    with tqdm(total=len(requests), desc="evaluation", unit="request", disable=not progress) as bar:
        out = policy.generate(weights, requests, key=jax.random.key(seed), progress=bar.update)
    seconds = time.perf_counter() - t0
    stats = getattr(policy.engine, "last_stats", None)
    generated_all = sum(x.num_tokens for group in out for x in group)
    timing: dict[str, dict[str, float]] = {
        "engine": {
            "seconds": seconds,
            "generated_tokens": float(generated_all),
            "tokens_per_s": generated_all / seconds if seconds > 0 else 0.0,
            "slot_utilisation": float(stats.slot_utilisation) if stats is not None else 0.0,
        }
    }
    counts = {"prompts_cut": getattr(policy, "prompts_cut", 0) - cut_before}
    counts["verifier_timeouts"] = 0
    for p, (name, _) in enumerate(passes):
        groups = out[p * len(prompts) : (p + 1) * len(prompts)]
        results_all, _ = score_groups(verifier, groups, answers)
        counts["verifier_timeouts"] += sum(r.reason == "timeout" for rs in results_all for r in rs)
        generated = sum(x.num_tokens for group in groups for x in group)
        timing[name] = {"generated_tokens": float(generated)}
        for rec, comps, results in zip(records, groups, results_all, strict=True):
            if name == "greedy":
                (comp,), (res,) = comps, results
                rec.greedy_completion, rec.greedy_extracted = comp.text, res.extracted
                rec.greedy_correct, rec.greedy_reason = is_correct(res.score), res.reason
                rec.greedy_tokens, rec.greedy_truncated = comp.num_tokens, comp.truncated
                continue
            rec.num_samples = len(comps)
            rec.sample_extracted = [r.extracted for r in results]
            rec.sample_correct = [is_correct(r.score) for r in results]
            rec.num_correct = sum(rec.sample_correct)
            rec.sample_tokens = [x.num_tokens for x in comps]
            rec.sample_truncated = [x.truncated for x in comps]
            if c.keep_sample_completions:
                rec.sample_completions = [x.text for x in comps]

    per_benchmark = {
        name: benchmark_metrics(
            [r for r in records if r.benchmark == name], c.num_samples, c.resolved_pass_ks
        )
        for name in benchmarks
    }
    p = policy.prompt
    provenance = {
        "seed": seed,
        "prompt_template": p.prompt_template,
        "instruction": policy.instruction,
        "system_prompt": p.system_prompt,
        "bos": p.bos,
        "stop_strings": list(p.stop_strings),
        "stop_token_ids": list(policy.stop_ids),
        "answer_mode": getattr(getattr(verifier, "config", None), "mode", None),
    }
    return EvalReport(
        config=c,
        benchmarks=per_benchmark,
        average=macro_average(list(per_benchmark.values())),
        records=records,
        timing=timing,
        meta=provenance | dict(meta or {}),
        counts=counts,
    )
