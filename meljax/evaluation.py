"""Benchmark evaluation: Pass@1 (greedy), Avg@k and Pass@k (sampled), per benchmark and averaged.

Protocol (as in the MEL paper):

* **Pass@1**: one greedy completion per problem (temperature 0); the fraction answered right.
* **Avg@k**: ``k = num_samples`` completions per problem at ``temperature``; the mean fraction
  right, i.e. the mean of ``c / n`` over problems (it equals the unbiased pass@1 estimate from
  those samples).
* **Pass@k**: the unbiased estimator of Chen et al. (2021) from the same ``n`` samples,
  ``1 - C(n - c, k) / C(n, k)`` averaged over problems, for each ``k`` of ``pass_ks``
  (default: ``k = n``, where it is the fraction of problems with at least one right answer).

Each metric is computed per benchmark, then macro-averaged over benchmarks (each benchmark
weighs the same, whatever its size). Completions come from the jitted grouped sampler
(:class:`meljax.sampling.Sampler`); answers are checked by :mod:`meljax.rewards`.

Entry points: :func:`pass_at_k`, :func:`evaluate`, :class:`EvalReport`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from meljax.data.prompts import DEFAULT_INSTRUCTION, format_prompt
from meljax.data.records import PRESETS, Problem, infer_preset, load_problems

__all__ = [
    "BenchmarkMetrics",
    "BenchmarkSpec",
    "EvalConfig",
    "EvalReport",
    "ProblemRecord",
    "benchmark_metrics",
    "default_stop_token_ids",
    "evaluate",
    "load_benchmarks",
    "macro_average",
    "parse_benchmark_specs",
    "pass_at_k",
]

# End-of-turn markers of common chat templates; a chat model ends its reply with one of them,
# which is not always the tokenizer's EOS (Llama 3's <|eot_id|> vs <|end_of_text|>).
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
)


# ---------------------------------------------------------------------------------------
# The estimator.
# ---------------------------------------------------------------------------------------


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"pass_at_k: {name} must be an integer, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    The probability that a random ``k``-subset of the ``n`` samples holds at least one correct
    one: ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` so
    that no large binomial is ever formed.

    Args:
      n: samples drawn (>= 1).
      c: correct samples, ``0 <= c <= n``.
      k: subset size, ``1 <= k <= n``.

    Returns:
      A float in ``[0, 1]``; exactly ``1.0`` when ``n - c < k`` (every subset has a correct one)
      and ``0.0`` when ``c == 0``.

    Raises:
      TypeError: a non-integer argument. ValueError: ``c`` or ``k`` out of range.
    """
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (i - k) / i
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


# ---------------------------------------------------------------------------------------
# Configuration, records, metrics.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation (stored in the report).

    Attributes:
      num_samples: completions per problem for Avg@k / Pass@k (``n``); 0 skips that pass.
      temperature, top_p, top_k: sampling controls of the sampled pass.
      max_new_tokens: completion length limit (tokens) of both passes.
      greedy: run the greedy pass (Pass@1).
      answer_mode: answer extraction of the verifier (``boxed``, ``last_number``,
        ``boxed_or_last_number``).
      prompt_template: ``chat`` or ``raw`` (see :func:`meljax.data.format_prompt`).
      instruction: answering instruction appended to each question (``""`` for none).
      system_prompt: optional system turn.
      batch_size: sequences per sampler call. The greedy pass sends ``batch_size`` prompts;
        the sampled pass ``max(1, batch_size // num_samples)`` prompts of ``num_samples`` rows,
        so both passes hold about the same KV-cache memory.
      seed: PRNG seed of the sampled pass.
      pass_ks: the ``k`` of the reported Pass@k values (each in ``[1, num_samples]``);
        empty means ``(num_samples,)``.
      keep_sample_completions: store every sampled completion's text in the records (large);
        their extracted answers and correctness are always stored.
    """

    num_samples: int = 8
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    greedy: bool = True
    answer_mode: str = "boxed"
    prompt_template: str = "chat"
    instruction: str = DEFAULT_INSTRUCTION
    system_prompt: str | None = None
    batch_size: int = 64
    seed: int = 0
    pass_ks: tuple[int, ...] = ()
    keep_sample_completions: bool = False

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError(f"EvalConfig: num_samples must be >= 0, got {self.num_samples}")
        if not self.greedy and self.num_samples == 0:
            raise ValueError("EvalConfig: greedy=False and num_samples=0 leave nothing to run")
        if self.max_new_tokens < 1:
            raise ValueError(f"EvalConfig: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"EvalConfig: batch_size must be >= 1, got {self.batch_size}")
        if self.num_samples and not self.temperature > 0:
            raise ValueError(
                f"EvalConfig: the sampled pass needs temperature > 0, got {self.temperature} "
                f"(greedy decoding is the separate Pass@1 pass; use num_samples=0 to skip sampling)"
            )
        for k in self.pass_ks:
            if not 1 <= k <= max(self.num_samples, 1) or self.num_samples == 0:
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

    @property
    def prompts_per_sampled_batch(self) -> int:
        return max(1, self.batch_size // max(self.num_samples, 1))


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


@dataclasses.dataclass(frozen=True)
class BenchmarkMetrics:
    """Metrics of one benchmark (or their macro average); fractions in ``[0, 1]``.

    Attributes:
      num_problems: problems evaluated (for the average: the total over benchmarks).
      pass1: greedy accuracy, ``None`` without the greedy pass.
      avg: Avg@n, mean of ``c / n``; ``None`` without the sampled pass.
      pass_at: ``{k: Pass@k}`` from the ``n`` samples.
      num_samples: ``n``.
      greedy_truncated: fraction of greedy completions cut by ``max_new_tokens``.
      mean_greedy_tokens: mean greedy completion length (tokens).
    """

    num_problems: int
    pass1: float | None
    avg: float | None
    pass_at: Mapping[int, float]
    num_samples: int
    greedy_truncated: float | None = None
    mean_greedy_tokens: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Flat dict with keys ``pass@1`` (greedy), ``avg@n`` and ``pass@k`` for each ``k``."""
        out: dict[str, Any] = {"num_problems": self.num_problems, "pass@1": self.pass1}
        if self.num_samples:
            out[f"avg@{self.num_samples}"] = self.avg
            for k, v in sorted(self.pass_at.items()):
                # Sampled pass@1 equals avg@n; name it apart from the greedy Pass@1.
                out["sampled_pass@1" if k == 1 else f"pass@{k}"] = v
        out["num_samples"] = self.num_samples
        out["greedy_truncated"] = self.greedy_truncated
        out["mean_greedy_tokens"] = self.mean_greedy_tokens
        return out


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def benchmark_metrics(
    records: Sequence[ProblemRecord], num_samples: int, pass_ks: Sequence[int]
) -> BenchmarkMetrics:
    """Pass@1, Avg@n and Pass@k of one benchmark's records (see the module docstring)."""
    if not records:
        raise ValueError("benchmark_metrics: no records")
    greedy = [r for r in records if r.greedy_correct is not None]
    pass1 = _mean([float(r.greedy_correct) for r in greedy])
    avg, pass_at = None, {}
    if num_samples:
        for r in records:
            if r.num_samples != num_samples:
                raise ValueError(
                    f"benchmark_metrics: problem {r.id!r} has {r.num_samples} samples, "
                    f"expected {num_samples}"
                )
        avg = _mean([r.num_correct / num_samples for r in records])
        pass_at = {
            k: float(np.mean([pass_at_k(num_samples, r.num_correct, k) for r in records]))
            for k in pass_ks
        }
    return BenchmarkMetrics(
        num_problems=len(records),
        pass1=pass1,
        avg=avg,
        pass_at=pass_at,
        num_samples=num_samples,
        greedy_truncated=_mean([float(bool(r.greedy_truncated)) for r in greedy]),
        mean_greedy_tokens=_mean([float(r.greedy_tokens or 0) for r in greedy]),
    )


def macro_average(metrics: Sequence[BenchmarkMetrics]) -> BenchmarkMetrics:
    """Unweighted mean over benchmarks of every metric; ``num_problems`` is the total."""
    if not metrics:
        raise ValueError("macro_average: no benchmarks")

    def avg_of(get: Callable[[BenchmarkMetrics], float | None]) -> float | None:
        values = [get(m) for m in metrics]
        return None if any(v is None for v in values) else float(np.mean(values))

    ks = sorted(set.intersection(*(set(m.pass_at) for m in metrics)))
    return BenchmarkMetrics(
        num_problems=sum(m.num_problems for m in metrics),
        pass1=avg_of(lambda m: m.pass1),
        avg=avg_of(lambda m: m.avg),
        pass_at={k: float(np.mean([m.pass_at[k] for m in metrics])) for k in ks},
        num_samples=metrics[0].num_samples,
        greedy_truncated=avg_of(lambda m: m.greedy_truncated),
        mean_greedy_tokens=avg_of(lambda m: m.mean_greedy_tokens),
    )


# ---------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}"


@dataclasses.dataclass
class EvalReport:
    """Result of :func:`evaluate`.

    Attributes:
      config: the :class:`EvalConfig` used.
      benchmarks: ``{name: metrics}`` in the order given.
      average: macro average over the benchmarks.
      records: one :class:`ProblemRecord` per problem, benchmarks in order, problems in file
        order.
      timing: per pass (``greedy``, ``sampled``): ``seconds`` (compilation included),
        ``generated_tokens``,
        ``tokens_per_s``, ``sampler_calls``.
      meta: free-form provenance (model path, benchmark files...), copied into the JSON.
    """

    config: EvalConfig
    benchmarks: dict[str, BenchmarkMetrics]
    average: BenchmarkMetrics
    records: list[ProblemRecord]
    timing: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self, *, include_records: bool = True) -> dict[str, Any]:
        """JSON-ready dict: ``config``, ``benchmarks``, ``average``, ``timing``, ``meta`` and
        (unless ``include_records=False``) ``records``."""
        out: dict[str, Any] = {
            "config": dataclasses.asdict(self.config)
            | {"pass_ks": list(self.config.resolved_pass_ks)},
            "benchmarks": {name: m.to_json() for name, m in self.benchmarks.items()},
            "average": self.average.to_json(),
            "timing": self.timing,
            "meta": self.meta,
        }
        if include_records:
            out["records"] = [r.to_json() for r in self.records]
        return out

    def table(self) -> str:
        """A Markdown table: benchmark | n | Pass@1 | Avg@k | Pass@k (percent)."""
        n = self.config.num_samples
        ks = [k for k in self.config.resolved_pass_ks if k != 1]
        header = ["benchmark", "n", "Pass@1"] + ([f"Avg@{n}"] if n else [])
        header += [f"Pass@{k}" for k in ks]

        def row(name: str, m: BenchmarkMetrics) -> list[str]:
            cells = [name, str(m.num_problems), _pct(m.pass1)]
            if n:
                cells.append(_pct(m.avg))
            return cells + [_pct(m.pass_at.get(k)) for k in ks]

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
        """Writes the JSON report (no records) to ``path`` and the records as JSONL beside it.

        The records file is ``<path without .json>.records.jsonl``; its name is stored in the
        report under ``records_file``. Missing parent folders are created.

        Returns:
          ``(report_path, records_path)``.
        """
        path = os.fspath(path)
        stem = path[: -len(".json")] if path.endswith(".json") else path
        records_path = stem + ".records.jsonl"
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        report = self.to_json(include_records=False)
        report["records_file"] = os.path.basename(records_path)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")
        with open(records_path, "w", encoding="utf-8") as f:
            for r in self.records:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        return path, records_path


# ---------------------------------------------------------------------------------------
# Benchmark files.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """One ``--benchmarks`` entry: report name, layout preset (``None``: inferred), path."""

    name: str
    preset: str | None
    path: str


def _file_name(path: str) -> str:
    """``data/my_bench.jsonl`` -> ``my_bench``; ``data/sums/test.jsonl`` -> ``sums``."""
    parts = [p for p in path.rstrip("/").split("/") if p]
    stem = parts[-1].split(".", 1)[0] if parts else path
    if stem in ("test", "train", "validation", "val", "dev", "data") and len(parts) > 1:
        return parts[-2]
    return stem or path


def parse_benchmark_specs(entries: str | Sequence[str]) -> list[BenchmarkSpec]:
    """``["math500=data/m5", "data/gsm8k/test.jsonl"]`` -> specs with unique names.

    ``entries`` may also be one comma-separated string (as in the ``eval.benchmarks`` config).

    The name is the preset (given or inferred from the path); the file stem is appended when
    two entries share a preset (``gsm8k/test``, ``gsm8k/train``). A path no preset matches is
    read with ``question`` / ``answer`` fields and named after its file (or its folder when
    the file is ``test``/``train``...).

    Raises:
      ValueError: an empty entry, an empty path, or an unknown preset.
    """
    if isinstance(entries, str):
        entries = entries.split(",")
    specs: list[tuple[str, str | None, str]] = []
    for entry in entries:
        entry = entry.strip()
        if not entry:
            raise ValueError("benchmark list has an empty entry")
        preset: str | None = None
        path = entry
        head, sep, tail = entry.partition("=")
        if sep and "/" not in head:  # PRESET=PATH (a bare path may itself contain '=')
            preset, path = head.strip(), tail.strip()
            if preset not in PRESETS:
                raise ValueError(
                    f"benchmark entry {entry!r}: unknown preset {preset!r}; "
                    f"known: {', '.join(sorted(PRESETS))}"
                )
            if not path:
                raise ValueError(f"benchmark entry {entry!r} has no path")
        # No preset: the file is read with question / answer fields, named after the file.
        name = preset or infer_preset(path) or _file_name(path)
        specs.append((name, preset, path))
    counts: dict[str, int] = {}
    for name, _, _ in specs:
        counts[name] = counts.get(name, 0) + 1
    out: list[BenchmarkSpec] = []
    seen: set[str] = set()
    for name, preset, path in specs:
        if counts[name] > 1:
            stem = os.path.basename(path.rstrip("/")).split(".", 1)[0]
            name = f"{name}/{stem}"
        base, i = name, 2
        while name in seen:
            name, i = f"{base}#{i}", i + 1
        seen.add(name)
        out.append(BenchmarkSpec(name=name, preset=preset, path=path))
    return out


def load_benchmarks(
    specs: Sequence[BenchmarkSpec], *, limit: int = 0, on_bad_row: str = "error"
) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]]]:
    """Loads each benchmark; returns ``({name: problems}, {name: file info for the report})``.

    Raises:
      FileNotFoundError: a local benchmark path does not exist.
      ValueError: a file without problems, or the loader's own errors (bad rows...).
    """
    problems: dict[str, list[Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if "://" not in spec.path and not os.path.exists(spec.path):
            raise FileNotFoundError(f"benchmark {spec.name!r}: no such file or folder: {spec.path}")
        loaded = load_problems(spec.path, spec.preset, on_bad_row=on_bad_row, limit=limit or None)
        if len(loaded) == 0:
            raise ValueError(f"benchmark {spec.name!r}: no problems in {loaded.path!r}")
        if loaded.num_skipped:
            logging.warning(
                "benchmark %s: skipped %d bad rows of %s",
                spec.name,
                loaded.num_skipped,
                loaded.path,
            )
        problems[spec.name] = list(loaded)
        info[spec.name] = {
            "path": loaded.path,
            "preset": loaded.preset,
            "num_problems": len(loaded),
            "num_skipped": loaded.num_skipped,
        }
    return problems, info


# ---------------------------------------------------------------------------------------
# Running the passes.
# ---------------------------------------------------------------------------------------


def default_stop_token_ids(tokenizer: Any, model_config: Any = None) -> list[int]:
    """Token ids that end a completion: EOS of the tokenizer and of the model config, and the
    end-of-turn markers of common chat templates that the tokenizer knows as single tokens.

    Ids outside the model's vocabulary (when ``model_config`` is given) are dropped.
    """
    ids: list[int] = []

    def add(x: Any) -> None:
        if isinstance(x, list | tuple):
            for y in x:
                add(y)
        elif x is not None and int(x) not in ids:
            ids.append(int(x))

    add(getattr(tokenizer, "eos_token_id", None))
    if model_config is not None:
        add(getattr(model_config, "eos_token_id", None))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for tok in _END_OF_TURN_TOKENS:
        if tok in vocab:
            add(vocab[tok])
    if model_config is not None:
        ids = [t for t in ids if 0 <= t < model_config.vocab_size]
    return ids


@dataclasses.dataclass
class _Item:
    """One problem to run: its place in the records and its prompt ids."""

    index: int
    prompt: list[int]
    answer: str


@dataclasses.dataclass
class _Completion:
    text: str
    num_tokens: int
    truncated: bool


def _split_model(model: Any) -> tuple[Any, Any]:
    """``(graphdef, params)`` from a model, a ``(graphdef, params)`` pair, or ``None``."""
    if model is None:
        return None, None
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ValueError(f"evaluate: model tuple must be (graphdef, params), got {len(model)}")
        return model
    from flax import nnx

    return nnx.split(model)


def _resolve_verifier(
    verify: Any, answer_mode: str, *, num_workers: int | None, timeout_s: float
) -> Callable[[Sequence[str], Sequence[str]], Sequence[Any]]:
    """A function ``(completions, answers) -> [RewardResult]``.

    ``verify`` may be ``None`` (:func:`meljax.rewards.score_batch` with ``answer_mode``,
    ``num_workers`` verifier processes (``None``: its default; 0: in this process) and a
    per-answer limit of ``timeout_s`` seconds), a callable, or an object with a ``score``
    method (a ``VerifierPool``).
    """
    if verify is None:
        from meljax.rewards import score_batch

        kw: dict[str, Any] = {"mode": answer_mode, "timeout_s": timeout_s}
        if num_workers is not None:
            kw["num_workers"] = num_workers
        return lambda completions, answers: score_batch(completions, answers, **kw)
    if hasattr(verify, "score") and callable(verify.score):
        return verify.score
    if callable(verify):
        return verify
    raise TypeError(f"evaluate: verify must be None, a callable or a VerifierPool, got {verify!r}")


def _is_correct(result: Any) -> bool:
    # Rewards are 1.0 for a verified answer and 0.0 otherwise (timeouts and crashes included).
    return float(result.score) >= 1.0


def _check_benchmarks(benchmarks: Mapping[str, Sequence[Problem]]) -> None:
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


def _encode_prompt(tokenizer: Any, text: str, template: str) -> list[int]:
    # A chat template writes its own BOS into the text; a raw prompt needs the tokenizer's.
    ids = tokenizer.encode(text, add_special_tokens=(template == "raw"))
    return [int(t) for t in ids]


def _run_pass(
    sampler: Any,
    params: Any,
    tokenizer: Any,
    items: Sequence[_Item],
    sampling: Any,
    key: Any,
    prompts_per_call: int,
    *,
    desc: str,
    progress: bool,
) -> tuple[dict[int, list[_Completion]], dict[str, float]]:
    """Samples ``sampling.num_samples`` completions for each item.

    Items are sent longest prompt first, so the largest shapes compile (or run out of memory)
    at once, and prompts of similar length share a batch (less padding, fewer length buckets).

    Returns:
      ``{item.index: [completion] * num_samples}`` and the pass's timing.
    """
    import jax
    from tqdm.auto import tqdm

    order = sorted(items, key=lambda it: -len(it.prompt))
    g = sampling.num_samples
    out: dict[int, list[_Completion]] = {}
    generated = 0
    calls = 0
    start = time.perf_counter()
    with tqdm(total=len(order), desc=desc, unit="problem", disable=not progress) as bar:
        for b, lo in enumerate(range(0, len(order), prompts_per_call)):
            batch = order[lo : lo + prompts_per_call]
            result = sampler.sample(
                params, [it.prompt for it in batch], sampling, jax.random.fold_in(key, b)
            )
            calls += 1
            if len(result) != len(batch) * g:
                raise RuntimeError(
                    f"evaluate: sampler returned {len(result)} rows for {len(batch)} prompts x "
                    f"{g} samples"
                )
            rows = [result.completion(r) for r in range(len(batch) * g)]
            texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
            for j, it in enumerate(batch):
                out[it.index] = [
                    _Completion(
                        text=texts[j * g + s],
                        num_tokens=len(rows[j * g + s]),
                        truncated=bool(result.truncated[j * g + s]),
                    )
                    for s in range(g)
                ]
            generated += sum(len(r) for r in rows)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    timing = {
        "seconds": seconds,
        "generated_tokens": float(generated),
        "tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        "sampler_calls": float(calls),
    }
    return out, timing


def evaluate(
    model: Any,
    tokenizer: Any,
    benchmarks: Mapping[str, Sequence[Problem]],
    *,
    sampler: Any = None,
    num_samples: int = 8,
    temperature: float = 0.6,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 1024,
    greedy: bool = True,
    answer_mode: str = "boxed",
    prompt_template: str = "chat",
    instruction: str = DEFAULT_INSTRUCTION,
    system_prompt: str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    pass_ks: Sequence[int] = (),
    keep_sample_completions: bool = False,
    progress: bool = True,
    verify: Any = None,
    verifier_workers: int | None = None,
    verify_timeout_s: float = 5.0,
    stop_token_ids: Sequence[int] | None = None,
    mesh: Any = None,
    cache_dtype: Any = None,
    meta: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Evaluates a model on benchmarks: Pass@1 (greedy), Avg@k and Pass@k (sampled).

    Args:
      model: a meljax ``Transformer``, a ``(graphdef, params)`` pair (``nnx.split``), or
        ``None`` when ``sampler`` needs no parameters.
      tokenizer: renders prompts (chat template), encodes them, decodes completions.
      benchmarks: ``{name: problems}``; each non-empty.
      sampler: an object with ``sample(params, prompts, SamplingParams, key) -> SampleResult``
        (rows ``i*G .. i*G+G-1`` for prompt ``i``); default: a :class:`meljax.sampling.Sampler`
        built for the model, whose batch is always padded to the same size so each pass
        compiles once per prompt-length bucket.
      num_samples: ``n`` completions per problem for Avg@n / Pass@k; 0 skips the sampled pass.
      temperature, top_p, top_k: sampling controls of the sampled pass.
      max_new_tokens: completion length limit (tokens).
      greedy: run the greedy Pass@1 pass.
      answer_mode: the verifier's answer extraction (see :func:`meljax.rewards.score_batch`).
      prompt_template, instruction, system_prompt: prompt rendering
        (:func:`meljax.data.format_prompt`).
      batch_size: sequences per sampler call (see :class:`EvalConfig`).
      seed: PRNG seed of the sampled pass.
      pass_ks: the ``k`` of the reported Pass@k; default ``(num_samples,)``.
      keep_sample_completions: keep every sampled completion's text in the records.
      progress: show a tqdm progress bar per pass.
      verify: ``None`` (:func:`meljax.rewards.score_batch`), a callable
        ``(completions, answers) -> [RewardResult]`` or a ``VerifierPool``; a result counts as
        correct when its ``score`` is 1.
      verifier_workers: processes of the default verifier (``None``: its default, 0: none).
      verify_timeout_s: per-answer time limit of the default verifier (seconds).
      stop_token_ids: override :func:`default_stop_token_ids` (only for the default sampler).
      mesh, cache_dtype: passed to the default sampler.
      meta: provenance copied into the report.

    Returns:
      An :class:`EvalReport`.
    """
    import jax

    from meljax.sampling import Sampler, SamplingParams

    cfg = EvalConfig(
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        answer_mode=answer_mode,
        prompt_template=prompt_template,
        instruction=instruction,
        system_prompt=system_prompt,
        batch_size=batch_size,
        seed=seed,
        pass_ks=tuple(int(k) for k in pass_ks),
        keep_sample_completions=keep_sample_completions,
    )
    _check_benchmarks(benchmarks)
    score = _resolve_verifier(
        verify, answer_mode, num_workers=verifier_workers, timeout_s=verify_timeout_s
    )
    graphdef, params = _split_model(model)
    if sampler is None and graphdef is None:
        raise ValueError("evaluate: give a model or a sampler")

    def sampler_for(prompts_per_call: int) -> Any:
        if sampler is not None:
            return sampler
        from meljax.sampling.sampler import config_from_graphdef

        model_config = config_from_graphdef(graphdef)
        stops = (
            list(stop_token_ids)
            if stop_token_ids is not None
            else default_stop_token_ids(tokenizer, model_config)
        )
        if not stops:
            raise ValueError(
                "evaluate: no stop token (the tokenizer has no EOS); pass stop_token_ids"
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        # A single batch bucket: a short last batch is padded with idle rows (which start
        # finished) instead of compiling another program for a smaller batch.
        return Sampler(
            graphdef,
            stop_token_ids=stops,
            pad_id=pad_id,
            mesh=mesh,
            cache_dtype=cache_dtype,
            batch_buckets=(prompts_per_call,),
        )

    records: list[ProblemRecord] = []
    items: list[_Item] = []
    for name, problems in benchmarks.items():
        for p in problems:
            text = format_prompt(
                p.question,
                tokenizer=tokenizer,
                template=prompt_template,
                instruction=instruction,
                system_prompt=system_prompt,
            )
            ids = _encode_prompt(tokenizer, text, prompt_template)
            items.append(_Item(index=len(records), prompt=ids, answer=p.answer))
            records.append(
                ProblemRecord(
                    benchmark=name,
                    id=p.id,
                    question=p.question,
                    answer=p.answer,
                    prompt_tokens=len(ids),
                )
            )

    timing: dict[str, dict[str, float]] = {}
    key = jax.random.PRNGKey(cfg.seed)
    # Never pad a batch beyond the number of problems (idle rows still cost compute).
    greedy_per_call = min(cfg.batch_size, len(items))
    sampled_per_call = min(cfg.prompts_per_sampled_batch, len(items))
    if cfg.greedy:
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, num_samples=1)
        done, timing["greedy"] = _run_pass(
            sampler_for(greedy_per_call),
            params,
            tokenizer,
            items,
            sampling,
            jax.random.fold_in(key, 0),
            greedy_per_call,
            desc="greedy",
            progress=progress,
        )
        completions = [done[it.index][0] for it in items]
        results = score([c.text for c in completions], [it.answer for it in items])
        if len(results) != len(items):
            raise RuntimeError(f"verifier returned {len(results)} results for {len(items)}")
        for it, c, r in zip(items, completions, results, strict=True):
            rec = records[it.index]
            rec.greedy_completion = c.text
            rec.greedy_extracted = r.extracted
            rec.greedy_correct = _is_correct(r)
            rec.greedy_reason = r.reason
            rec.greedy_tokens = c.num_tokens
            rec.greedy_truncated = c.truncated

    if cfg.num_samples:
        g = cfg.num_samples
        sampling = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            num_samples=g,
        )
        done, timing["sampled"] = _run_pass(
            sampler_for(sampled_per_call),
            params,
            tokenizer,
            items,
            sampling,
            jax.random.fold_in(key, 1),
            sampled_per_call,
            desc=f"sampled x{g}",
            progress=progress,
        )
        texts = [c.text for it in items for c in done[it.index]]
        answers = [it.answer for it in items for _ in range(g)]
        results = score(texts, answers)
        if len(results) != len(texts):
            raise RuntimeError(f"verifier returned {len(results)} results for {len(texts)}")
        for j, it in enumerate(items):
            rec = records[it.index]
            mine = results[j * g : (j + 1) * g]
            comps = done[it.index]
            rec.num_samples = g
            rec.sample_extracted = [r.extracted for r in mine]
            rec.sample_correct = [_is_correct(r) for r in mine]
            rec.num_correct = sum(rec.sample_correct)
            rec.sample_tokens = [c.num_tokens for c in comps]
            rec.sample_truncated = [c.truncated for c in comps]
            if cfg.keep_sample_completions:
                rec.sample_completions = [c.text for c in comps]

    per_benchmark = {
        name: benchmark_metrics(
            [r for r in records if r.benchmark == name], cfg.num_samples, cfg.resolved_pass_ks
        )
        for name in benchmarks
    }
    return EvalReport(
        config=cfg,
        benchmarks=per_benchmark,
        average=macro_average(list(per_benchmark.values())),
        records=records,
        timing=timing,
        meta=dict(meta or {}),
    )
