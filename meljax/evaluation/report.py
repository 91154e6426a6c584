"""The evaluation report: settings, per-problem records, the table and the JSON files."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from meljax.config.schema import option, validate_fields
from meljax.evaluation.metrics import BenchmarkMetrics
from meljax.runtime import files

__all__ = ["EvalConfig", "EvalReport", "ProblemRecord"]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of an evaluation (config section ``eval``; see ``meljax.config.schema``).

    Prompt rendering, stop tokens and strings come from the :class:`meljax.sampling.policy.Policy`, and
    answer checking from the :class:`meljax.rewards.Verifier`: the same as in training.
    """

    every_steps: int = option(0, "evaluate every N training steps (0 = never)", minimum=0)
    at_start: bool = option(
        False, "also evaluate the initial policy as step 0, before training (same settings)"
    )
    benchmarks: str = option("", "comma-separated PATH or PRESET=PATH entries")
    limit: int = option(0, "problems per benchmark (0 = all)", minimum=0)
    num_samples: int = option(8, "k of Avg@k / Pass@k (0 = no sampled pass)", minimum=0)
    temperature: float = option(0.6, "sampling temperature of Avg@k / Pass@k", minimum=0)
    top_p: float = option(1.0, "nucleus sampling of the sampled pass", minimum=1e-9)
    top_k: int = option(0, "top-k sampling of the sampled pass (0 = off)", minimum=0)
    max_new_tokens: int = option(1024, "answer length limit at evaluation", minimum=1)
    greedy: bool = option(True, "run the greedy pass (Pass@1)")
    pass_ks: tuple = option((), "k of the reported Pass@k, each in [1, num_samples]; () = (k,)")
    keep_sample_completions: bool = option(
        False, "store every sampled completion's text in the records (large)"
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        if not self.greedy and self.num_samples == 0:
            raise ValueError("EvalConfig: greedy=False and num_samples=0 leave nothing to run")
        if self.num_samples and not self.temperature > 0:
            raise ValueError(
                f"EvalConfig: the sampled pass needs temperature > 0, got {self.temperature} "
                f"(greedy decoding is the separate Pass@1 pass; use num_samples=0 to skip sampling)"
            )
        for k in self.pass_ks:
            if self.num_samples == 0 or not 1 <= k <= self.num_samples:
                raise ValueError(
                    f"EvalConfig: pass_ks {self.pass_ks} must lie in [1, num_samples="
                    f"{self.num_samples}]"
                )

    @property
    def resolved_pass_ks(self) -> tuple[int, ...]:
        """The ``k`` values of the reported Pass@k (sorted, unique); empty without sampling."""
        if self.num_samples == 0:
            return ()
        return tuple(sorted(set(self.pass_ks or (self.num_samples,))))


@dataclasses.dataclass
class ProblemRecord:
    """What happened on one problem.

    Greedy fields are ``None`` when the greedy pass was off; sample fields are empty when the
    sampled pass was off. Token counts include the stop token.
    """

    benchmark: str
    id: str
    question: str
    answer: str
    prompt_tokens: int
    greedy_completion: str | None = None
    greedy_extracted: str | None = None
    greedy_correct: bool | None = None
    greedy_reason: str | None = None
    greedy_tokens: int | None = None
    greedy_truncated: bool | None = None
    num_samples: int = 0
    num_correct: int = 0
    sample_extracted: list[str | None] = dataclasses.field(default_factory=list)
    sample_correct: list[bool] = dataclasses.field(default_factory=list)
    sample_tokens: list[int] = dataclasses.field(default_factory=list)
    sample_truncated: list[bool] = dataclasses.field(default_factory=list)
    sample_completions: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pct(x: float | None, ci: tuple[float, float] | None = None) -> str:
    if x is None:
        return "-"
    cell = f"{100.0 * x:.1f}"
    return cell if ci is None else f"{cell} ({100.0 * ci[0]:.1f}-{100.0 * ci[1]:.1f})"


@dataclasses.dataclass
class EvalReport:
    """Result of :func:`meljax.evaluation.evaluate`.

    Attributes:
      config: the :class:`EvalConfig` used.
      benchmarks: ``{name: metrics}`` in the order given.
      average: macro average over the benchmarks.
      records: one :class:`ProblemRecord` per problem, benchmarks in order, problems in file
        order.
      timing: ``engine``: the one engine run of both passes: ``seconds`` (compilation
        included), ``generated_tokens``, ``tokens_per_s``, ``slot_utilisation``; per pass
        (``greedy``, ``sampled``): ``generated_tokens``.
      meta: provenance (model, benchmark files, seed, prompt and verifier settings).
      counts: what was cut or lost on the way: ``prompts_cut`` (prompts cut to the model's
        context or ``max_prompt_tokens``, ``meljax.sampling.policy.prompt_limit``) and
        ``verifier_timeouts`` (answers that scored 0 because their check timed out).
    """

    config: EvalConfig
    benchmarks: dict[str, BenchmarkMetrics]
    average: BenchmarkMetrics
    records: list[ProblemRecord]
    timing: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self, *, include_records: bool = True) -> dict[str, Any]:
        """JSON-ready dict: ``config``, ``benchmarks``, ``average``, ``timing``, ``meta``,
        ``counts`` and (unless ``include_records=False``) ``records``."""
        out: dict[str, Any] = {
            "config": dataclasses.asdict(self.config)
            | {"pass_ks": list(self.config.resolved_pass_ks)},
            "benchmarks": {name: m.to_json() for name, m in self.benchmarks.items()},
            "average": self.average.to_json(),
            "timing": self.timing,
            "meta": self.meta,
            "counts": self.counts,
        }
        if include_records:
            out["records"] = [r.to_json() for r in self.records]
        return out

    def table(self) -> str:
        """A Markdown table: benchmark | n | Pass@1 | Avg@k | Pass@k, in percent, each with its
        95% interval in parentheses."""
        n = self.config.num_samples
        ks = [k for k in self.config.resolved_pass_ks if k != 1]
        header = ["benchmark", "n", "Pass@1"] + ([f"Avg@{n}"] if n else [])
        header += [f"Pass@{k}" for k in ks]

        def row(name: str, m: BenchmarkMetrics) -> list[str]:
            cells = [name, str(m.num_problems), _pct(m.pass1, m.ci.get("pass@1"))]
            if n:
                cells.append(_pct(m.avg, m.ci.get(f"avg@{n}")))
            return cells + [_pct(m.pass_at.get(k), m.ci.get(f"pass@{k}")) for k in ks]

        rows = [row(name, m) for name, m in self.benchmarks.items()]
        rows.append(row("average", self.average))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            parts = [
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "| " + " | ".join(parts) + " |"

        rule = (
            "|"
            + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths))
            + "|"
        )
        return "\n".join([line(header), rule, *[line(r) for r in rows]])

    def write(self, path: str) -> tuple[str, str]:
        """Writes the JSON report (no records) to ``path`` and the records as JSONL beside it
        (local or remote paths; missing folders are created).

        The records file is ``<path without .json>.records.jsonl``; its name is stored in the
        report under ``records_file``.

        Returns:
          ``(report_path, records_path)``.
        """
        path = os.fspath(path)
        stem = path[: -len(".json")] if path.endswith(".json") else path
        records_path = stem + ".records.jsonl"
        report = self.to_json(include_records=False)
        report["records_file"] = os.path.basename(records_path)
        files.write_json(path, report)
        files.write_text(records_path, "".join(files.json_line(r.to_json()) for r in self.records))
        return path, records_path
