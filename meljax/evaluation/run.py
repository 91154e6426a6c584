"""``evaluate``: the policy's rollouts on benchmarks (G = 1 greedy, G = k sampled), then metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meljax.evaluation.metrics import benchmark_metrics, macro_average
from meljax.evaluation.report import EvalConfig, EvalReport, ProblemRecord
from meljax.rewards import Scorer, is_correct
from meljax.sampling import SamplingParams

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
    verifier: Scorer,
    benchmarks: Mapping[str, Sequence[Any]],
    config: EvalConfig = EvalConfig(),
    *,
    seed: int = 0,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Pass@1 (greedy), Avg@k and Pass@k of ``policy`` (its current weights) on benchmarks.

    Args:
      policy: a :class:`meljax.policy.Policy`: prompts, stops and sampling as in training.
      verifier: a :class:`meljax.rewards.Verifier` (``score(completions, answers)``).
      benchmarks: ``{name: problems}`` (``id``, ``question``, ``answer``); each non-empty.
      config: the passes (``every_steps``, ``benchmarks`` and ``limit`` are the trainer's).
      seed: PRNG seed of the sampled pass.
      progress: a progress bar per pass.
      meta: provenance copied into the report.
    """
    import jax
    from tqdm.auto import tqdm

    from meljax.trainer.rollout import sample_and_score

    _check_benchmarks(benchmarks)
    records: list[ProblemRecord] = []
    prompts, answers = [], []
    for name, problems in benchmarks.items():
        for p in problems:
            ids = policy.encode(p.question)
            prompts.append(ids)
            answers.append(p.answer)
            records.append(ProblemRecord(name, p.id, p.question, p.answer, len(ids)))
    c = config
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
    key = jax.random.key(seed)
    timing: dict[str, dict[str, float]] = {}
    for name, sampling in passes:
        pass_key = jax.random.fold_in(key, 0 if name == "greedy" else 1)
        desc = name if name == "greedy" else f"sampled x{sampling.num_samples}"
        with tqdm(total=len(prompts), desc=desc, unit="problem", disable=not progress) as bar:
            groups = sample_and_score(
                policy, verifier, prompts, answers, sampling, pass_key, bar.update
            )
        generated = sum(x.num_tokens for x in groups.flat())
        seconds = groups.seconds["rollout"]
        timing[name] = {
            "seconds": seconds,
            "generated_tokens": float(generated),
            "tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        }
        for rec, comps, results in zip(records, groups.completions, groups.results, strict=True):
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
    )
