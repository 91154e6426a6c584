"""One step of meta-experience generation (MEL.md steps 4 to 7) and its NLL batch.

:meth:`MetaExperiencePipeline.run` takes a step's rollouts and rewards and

1. draws contrastive pairs from the mixed groups (:mod:`meljax.meta.pairs`);
2. fills the analysis instruction for every pair (incorrect answer first, answers shortened in
   the middle to fit ``analysis_max_prompt_tokens``) and samples ONE analysis per pair from the
   current policy, in one batched sampler call (the "analysis pass");
3. parses each analysis into its sections (for the log and the quality filter);
4. drops empty, truncated, malformed (a section missing or no heuristic) and answer-leaking
   analyses (:mod:`meljax.meta.filters`);
5. replays the survivors: one batched sampler call with the replay prompt, one answer each,
   verified against the ground truth; an analysis is *kept* when its replay answer is correct;
6. builds the NLL :class:`~meljax.batch.SequenceBatch`: context = the analysis prompt token ids
   exactly as the sampler saw them (no loss), target = the analysis token ids as sampled,
   stop token included (loss). Its shape is fixed by the config, so the update step compiles
   once; a step with nothing kept gives an all-padding batch (weight 0, loss term 0);
7. appends one JSON record per generated analysis to ``meta_experiences.jsonl`` (chief only).

Retention ratio (the quantity MEL.md asks to log): ``kept / generated``, where *generated*
counts every analysis the policy produced this step (empty, truncated and leaking ones
included). ``replay_pass_ratio = kept / replayed`` is logged too: the share of analyses that
survived the filters and then helped the replay. Both are 0 in a step without analyses.

A step without any mixed group skips everything: no sampler call, all counts 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from meljax.batch import SequenceBatch, build_sequence_batch
from meljax.buckets import DEFAULT_LENGTH_BUCKETS
from meljax.meta import filters, pairs, parse, templates
from meljax.sampling import SampleResult, SamplingParams

__all__ = [
    "META_LOG_FILE",
    "JsonlWriter",
    "MetaConfig",
    "MetaCounts",
    "MetaExperiencePipeline",
    "MetaResult",
    "PolicySampler",
    "ProblemLike",
]

META_LOG_FILE = "meta_experiences.jsonl"

# One call scores a list of completions against their answers; it may return plain floats or
# reward results with ``.score`` (and optionally ``.extracted``), e.g. ``VerifierPool.score``.
VerifyFn = Callable[[list[str], list[str]], Sequence[Any]]


class PolicySampler(Protocol):
    """Anything that samples from the current policy like :class:`meljax.sampling.Sampler`."""

    def sample(
        self,
        params: Any,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        key: jax.Array,
    ) -> SampleResult: ...


class ProblemLike(Protocol):
    """``meljax.data.Problem`` or anything with the same three fields."""

    id: str
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Every knob of the meta-experience pipeline (the trainer maps config fields of the same
    names onto it).

    Attributes:
      max_pairs_per_query: at most this many contrastive pairs per question.
      correct_threshold: a reward ``>=`` this counts as a correct answer (rollouts and replay).
      analysis_template: ``None`` (built-in), a file path, or the template text; placeholders
        ``{question}``, ``{incorrect_answer}``, ``{correct_answer}``.
      replay_template: ``None``, a file path or the text; placeholders ``{experience}``,
        ``{question}`` and optionally ``{instruction}``.
      replay_instruction: text put at the replay template's ``{instruction}`` (it should ask
        for the answer format the verifier reads).
      analysis_max_prompt_tokens: limit of the rendered analysis prompt; answers are shortened
        in the middle to fit. Pairs whose question alone does not fit are skipped
        (``too_long``).
      min_answer_tokens: an answer is never shortened below this many tokens.
      analysis_max_new_tokens, analysis_temperature, analysis_top_p, analysis_top_k: sampling
        of the analysis pass.
      replay_max_new_tokens, replay_temperature, replay_top_p, replay_top_k: sampling of the
        replay pass (one answer per analysis).
      filter_leaks: drop analyses that contain the ground-truth answer.
      filter_malformed: drop analyses missing one of the four sections or whose heuristics
        section holds no words (counted as ``malformed``); ``False`` keeps them, flagged in
        the log only.
      answer_mode: how the default verifier extracts answers (``meljax.rewards.score_batch``
        mode: ``"boxed"``, ``"last_number"``, ``"boxed_or_last_number"``).
      nll_max_len: tokens per NLL row; ``None``: analysis prompt limit + analysis new tokens.
      nll_rows: minimum NLL rows; ``None``: ``max_pairs_per_query`` x the step's questions.
      nll_batch_multiple: NLL rows are a multiple of this (the data-parallel size).
      nll_bucketed: ``False`` (default): the NLL batch always has the fixed shape
        ``[bucket(nll_rows), nll_length]``, so the update compiles once, but pays for every
        padding row. ``True``: rows are bucketed to the kept count (at least
        ``nll_batch_multiple``) and T to the longest kept row (power-of-two buckets, at most
        ``nll_length``): cheaper updates, a few more compiled shapes.
      seed: pairs of step ``s`` are drawn from ``np.random.default_rng([seed, s])``.
      log_file: name of the JSONL log inside the work directory.
    """

    max_pairs_per_query: int = 2
    correct_threshold: float = 0.5
    analysis_template: str | None = None
    replay_template: str | None = None
    replay_instruction: str = templates.DEFAULT_REPLAY_INSTRUCTION
    analysis_max_prompt_tokens: int = 1024
    min_answer_tokens: int = 16
    analysis_max_new_tokens: int = 1024
    analysis_temperature: float = 1.0
    analysis_top_p: float = 1.0
    analysis_top_k: int = 0
    replay_max_new_tokens: int = 256
    replay_temperature: float = 1.0
    replay_top_p: float = 1.0
    replay_top_k: int = 0
    filter_leaks: bool = True
    filter_malformed: bool = True
    answer_mode: str = "boxed"
    nll_max_len: int | None = None
    nll_rows: int | None = None
    nll_batch_multiple: int = 1
    nll_bucketed: bool = False
    seed: int = 0
    log_file: str = META_LOG_FILE

    def __post_init__(self):
        positive = (
            "max_pairs_per_query",
            "analysis_max_prompt_tokens",
            "analysis_max_new_tokens",
            "replay_max_new_tokens",
            "nll_batch_multiple",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"MetaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_answer_tokens < 0:
            raise ValueError(
                f"MetaConfig.min_answer_tokens must be >= 0, got {self.min_answer_tokens}"
            )
        if self.nll_max_len is not None and self.nll_max_len < self.max_nll_row:
            raise ValueError(
                f"MetaConfig.nll_max_len={self.nll_max_len} is shorter than "
                f"analysis_max_prompt_tokens + analysis_max_new_tokens = {self.max_nll_row}"
            )

    @property
    def max_nll_row(self) -> int:
        """Longest possible NLL row: a full analysis prompt plus a full analysis."""
        return self.analysis_max_prompt_tokens + self.analysis_max_new_tokens

    @property
    def nll_length(self) -> int:
        """T of the NLL batch."""
        return self.nll_max_len if self.nll_max_len is not None else self.max_nll_row

    def analysis_sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.analysis_max_new_tokens,
            temperature=self.analysis_temperature,
            top_p=self.analysis_top_p,
            top_k=self.analysis_top_k,
            num_samples=1,
        )

    def replay_sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.replay_max_new_tokens,
            temperature=self.replay_temperature,
            top_p=self.replay_top_p,
            top_k=self.replay_top_k,
            num_samples=1,
        )


@dataclasses.dataclass(frozen=True)
class MetaCounts:
    """What happened in one step (every count is a number of analyses unless said otherwise).

    Attributes:
      questions: questions in the step; mixed_groups: those with a mixed group.
      pairs: contrastive pairs drawn; too_long: pairs skipped because the question alone
        overflows the analysis prompt limit; generated: analyses sampled (pairs - too_long).
      empty, truncated, malformed, leak: dropped by that filter (each analysis counts once,
        first reason in this order; malformed: a section missing or no heuristic, counted only
        when ``filter_malformed`` is on).
      replayed: analyses that passed the filters; kept: replay answer correct.
      shortened: analysis prompts whose answers were shortened.
    """

    questions: int = 0
    mixed_groups: int = 0
    pairs: int = 0
    too_long: int = 0
    generated: int = 0
    empty: int = 0
    truncated: int = 0
    malformed: int = 0
    leak: int = 0
    replayed: int = 0
    kept: int = 0
    shortened: int = 0

    @property
    def replay_failed(self) -> int:
        return self.replayed - self.kept


@dataclasses.dataclass
class MetaResult:
    """Output of one pipeline step.

    Attributes:
      batch: the NLL batch (``[rows, nll_length]``; all padding with weight 0 when nothing is
        kept).
      counts: see :class:`MetaCounts`.
      retention_ratio: ``kept / generated`` (0 when nothing was generated).
      replay_pass_ratio: ``kept / replayed`` (0 when nothing was replayed).
      timings: seconds per phase: ``analysis_s`` (prompt filling, sampling, decoding,
        parsing), ``replay_s`` (replay prompts, sampling, verification), ``total_s``.
      records: one JSON-ready dict per generated analysis (what the log file gets).
    """

    batch: SequenceBatch
    counts: MetaCounts
    retention_ratio: float
    replay_pass_ratio: float
    timings: dict[str, float]
    records: list[dict[str, Any]]

    def metrics(self, prefix: str = "mel/") -> dict[str, float]:
        """Flat scalars for a metrics writer."""
        out = {f"{prefix}{k}": float(v) for k, v in dataclasses.asdict(self.counts).items()}
        out[f"{prefix}replay_failed"] = float(self.counts.replay_failed)
        out[f"{prefix}retention_ratio"] = self.retention_ratio
        out[f"{prefix}replay_pass_ratio"] = self.replay_pass_ratio
        out.update({f"{prefix}{k}": float(v) for k, v in self.timings.items()})
        return out


class JsonlWriter:
    """Appends records to a JSON Lines file, one object per line (UTF-8, flushed per call)."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _scores(results: Sequence[Any]) -> tuple[list[float], list[str | None]]:
    """Accepts floats or reward results (``.score``, optional ``.extracted``)."""
    scores, extracted = [], []
    for r in results:
        if hasattr(r, "score"):
            scores.append(float(r.score))
            extracted.append(getattr(r, "extracted", None))
        else:
            scores.append(float(r))
            extracted.append(None)
    return scores, extracted


def _default_verify(mode: str) -> VerifyFn:
    def verify(completions: list[str], answers: list[str]) -> Sequence[Any]:
        from meljax.rewards import score_batch  # lazy: only needed without a caller's verifier

        return score_batch(completions, answers, mode=mode)

    return verify


class MetaExperiencePipeline:
    """Generates, filters, validates and batches meta-experiences, one call per step.

    Args:
      sampler: samples from the current policy (see :class:`PolicySampler`). Its prompt limit,
        if any (``max_prompt_len``), must admit ``analysis_max_prompt_tokens``: a prompt cut by
        the sampler would no longer be the NLL context.
      tokenizer: a ``transformers`` tokenizer (counting/cutting answers, decoding outputs).
      render_prompt: user-message text -> full policy prompt text (chat template included),
        the same rendering the rollouts use.
      config: the knobs.
      verify: ``(completions, answers) -> scores or reward results``; default
        ``meljax.rewards.score_batch(..., mode=config.answer_mode)``.
      encode: full prompt text -> token ids fed to the sampler; default
        ``tokenizer.encode(text, add_special_tokens=False)`` (chat templates carry their own
        special tokens). Pass the rollouts' own encoder to keep both identical.
      workdir: where ``config.log_file`` is appended to (chief only); ``None``: no file.
      is_chief: only the chief writes the log.
      writer: a custom ``records -> None`` sink, replacing the file (still chief only).
      pad_id: NLL batch padding id; default the tokenizer's pad (else EOS, else 0).
    """

    def __init__(
        self,
        *,
        sampler: PolicySampler,
        tokenizer: Any,
        render_prompt: Callable[[str], str],
        config: MetaConfig = MetaConfig(),
        verify: VerifyFn | None = None,
        encode: Callable[[str], Sequence[int]] | None = None,
        workdir: str | None = None,
        is_chief: bool = True,
        writer: Callable[[list[dict[str, Any]]], None] | None = None,
        pad_id: int | None = None,
    ):
        limit = getattr(sampler, "max_prompt_len", None)
        if limit is not None and limit < config.analysis_max_prompt_tokens:
            raise ValueError(
                f"the sampler cuts prompts to max_prompt_len={limit} tokens, below "
                f"MetaConfig.analysis_max_prompt_tokens={config.analysis_max_prompt_tokens}; "
                f"raise the sampler's limit or lower the analysis prompt limit"
            )
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.render_prompt = render_prompt
        self.config = config
        self.verify = verify if verify is not None else _default_verify(config.answer_mode)
        self.encode = encode or (lambda s: tokenizer.encode(s, add_special_tokens=False))
        self.cutter = templates.TokenCutter(tokenizer)
        self.analysis_template = templates.load_template(
            config.analysis_template,
            default=templates.DEFAULT_ANALYSIS_TEMPLATE,
            required=templates.ANALYSIS_FIELDS,
            what="analysis_template",
        )
        self.replay_template = templates.load_template(
            config.replay_template,
            default=templates.DEFAULT_REPLAY_TEMPLATE,
            required=templates.REPLAY_FIELDS,
            what="replay_template",
        )
        if writer is None and workdir is not None:
            writer = JsonlWriter(os.path.join(workdir, config.log_file))
        self.writer = writer if is_chief else None
        if pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
            if pad_id is None:
                pad_id = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad_id or 0)

    # -- helpers

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def nll_rows(self, num_questions: int) -> int:
        """Minimum rows of the NLL batch for a step of ``num_questions`` questions."""
        if self.config.nll_rows is not None:
            return self.config.nll_rows
        return max(1, self.config.max_pairs_per_query * num_questions)

    def empty_batch(self, num_questions: int) -> SequenceBatch:
        """The all-padding NLL batch (weight 0) a step without kept analyses returns."""
        return self._batch([], [], num_questions)

    def _batch(
        self, contexts: list[list[int]], targets: list[list[int]], num_questions: int
    ) -> SequenceBatch:
        cfg = self.config
        if cfg.nll_bucketed:
            top = cfg.nll_length
            return build_sequence_batch(
                contexts,
                targets,
                pad_id=self.pad_id,
                length_buckets=(*(b for b in DEFAULT_LENGTH_BUCKETS if b < top), top),
                min_rows=1,
                batch_multiple=cfg.nll_batch_multiple,
            )
        return build_sequence_batch(
            contexts,
            targets,
            pad_id=self.pad_id,
            min_rows=self.nll_rows(num_questions),
            batch_multiple=cfg.nll_batch_multiple,
            max_len=cfg.nll_length,
        )

    # -- the step

    def run(
        self,
        step: int,
        problems: Sequence[ProblemLike],
        completions: Sequence[str],
        rewards: Sequence[float] | np.ndarray,
        group_size: int,
        params: Any,
        key: jax.Array,
    ) -> MetaResult:
        """Runs steps 4 to 7 of MEL.md for one training step.

        Args:
          step: the training step (seeds pair selection; written to the log).
          problems: the step's ``N`` questions (``.id``, ``.question``, ``.answer``).
          completions: ``N*G`` decoded answers; row ``i*G + g`` answers question ``i``.
          rewards: ``N*G`` (or ``[N, G]``) rewards of those answers.
          group_size: ``G``.
          params: the current policy parameters, passed to the sampler.
          key: PRNG key of this step's meta sampling (split into analysis and replay keys).
        """
        cfg = self.config
        t_start = time.perf_counter()
        n = len(problems)
        r = pairs.group_rewards(rewards, group_size)
        if r.shape[0] != n:
            raise ValueError(
                f"{n} problems but rewards for {r.shape[0]} groups of {group_size} answers"
            )
        if len(completions) != n * group_size:
            raise ValueError(
                f"{len(completions)} completions, expected {n} problems x {group_size} = "
                f"{n * group_size}"
            )
        mixed = pairs.mixed_groups(r, correct_threshold=cfg.correct_threshold)
        chosen = pairs.select_pairs(
            r,
            max_pairs_per_query=cfg.max_pairs_per_query,
            rng=pairs.pair_rng(cfg.seed, step),
            correct_threshold=cfg.correct_threshold,
        )
        counts = {"questions": n, "mixed_groups": len(mixed), "pairs": len(chosen)}

        # Step 5: analysis prompts, one batched sampler call.
        t0 = time.perf_counter()
        filled: list[tuple[pairs.ContrastivePair, templates.FilledPrompt]] = []
        for pair in chosen:
            prob = problems[pair.question]
            inc_row, cor_row = pair.rows(group_size)
            prompt = templates.fill_analysis_prompt(
                prob.question,
                completions[inc_row],
                completions[cor_row],
                template=self.analysis_template,
                render=self.render_prompt,
                encode=self.encode,
                cutter=self.cutter,
                max_prompt_tokens=cfg.analysis_max_prompt_tokens,
                min_answer_tokens=cfg.min_answer_tokens,
            )
            if prompt is not None:
                filled.append((pair, prompt))
        counts["too_long"] = len(chosen) - len(filled)
        counts["generated"] = len(filled)
        counts["shortened"] = sum(1 for _, p in filled if any(p.omitted))
        key_analysis, key_replay = jax.random.split(key)
        analyses: list[tuple[list[int], str, bool]] = []  # (ids incl. stop, text, truncated)
        if filled:
            out = self.sampler.sample(
                params, [p.ids for _, p in filled], cfg.analysis_sampling(), key_analysis
            )
            for i in range(len(filled)):
                ids = out.completion(i)
                analyses.append((ids, self._decode(ids), bool(out.truncated[i])))
        analysis_s = time.perf_counter() - t0

        # Steps 3-4 of the brief: parse for the log, then filter (the record's "malformed" is
        # the quality flag whatever the analysis's fate; its "status" says why it was dropped).
        records: list[dict[str, Any]] = []
        survivors: list[int] = []
        for k, ((pair, prompt), (ids, text, truncated)) in enumerate(
            zip(filled, analyses, strict=True)
        ):
            prob = problems[pair.question]
            parsed = parse.parse_analysis(text)
            reason = filters.filter_reason(
                text,
                truncated=truncated,
                answer=prob.answer,
                check_leaks=cfg.filter_leaks,
                check_malformed=cfg.filter_malformed,
            )
            records.append(
                {
                    "step": int(step),
                    "question_id": str(prob.id),
                    "question": prob.question,
                    "answer": prob.answer,
                    "pair": {"incorrect": pair.incorrect, "correct": pair.correct},
                    "text": text,
                    "sections": parsed.as_dict(),
                    "malformed": parsed.malformed,
                    "prompt_tokens": len(prompt.ids),
                    "omitted_tokens": list(prompt.omitted),
                    "num_tokens": len(ids),
                    "empty": reason == "empty",
                    "truncated": reason == "truncated",
                    "leak": reason == "leak",
                    "replay_failed": False,
                    "replay_text": None,
                    "replay_extracted": None,
                    "replay_score": None,
                    "status": reason,
                    "kept": False,
                }
            )
            if reason == "ok":
                survivors.append(k)
        for reason in filters.FILTER_REASONS:
            counts[reason] = sum(1 for rec in records if rec["status"] == reason)
        counts["replayed"] = len(survivors)

        # Step 7 of MEL.md: replay validation, one batched sampler call.
        t0 = time.perf_counter()
        if survivors:
            replay_prompts = []
            for k in survivors:
                question = problems[filled[k][0].question].question
                user = templates.fill_replay_prompt(
                    analyses[k][1],
                    question,
                    template=self.replay_template,
                    instruction=cfg.replay_instruction,
                )
                replay_prompts.append(list(self.encode(self.render_prompt(user))))
            out = self.sampler.sample(params, replay_prompts, cfg.replay_sampling(), key_replay)
            replay_texts = [self._decode(out.completion(j)) for j in range(len(survivors))]
            answers = [problems[filled[k][0].question].answer for k in survivors]
            scores, extracted = _scores(self.verify(replay_texts, answers))
            if len(scores) != len(survivors):
                raise ValueError(
                    f"verify returned {len(scores)} results for {len(survivors)} replay answers"
                )
            for j, k in enumerate(survivors):
                ok = scores[j] >= cfg.correct_threshold
                records[k].update(
                    replay_text=replay_texts[j],
                    replay_extracted=extracted[j],
                    replay_score=scores[j],
                    replay_failed=not ok,
                    status="kept" if ok else "replay_failed",
                    kept=ok,
                )
        replay_s = time.perf_counter() - t0

        kept = [k for k in survivors if records[k]["kept"]]
        counts["kept"] = len(kept)
        batch = self._batch([filled[k][1].ids for k in kept], [analyses[k][0] for k in kept], n)
        if self.writer is not None:
            self.writer(records)
        c = MetaCounts(**counts)
        return MetaResult(
            batch=batch,
            counts=c,
            retention_ratio=c.kept / c.generated if c.generated else 0.0,
            replay_pass_ratio=c.kept / c.replayed if c.replayed else 0.0,
            timings={
                "analysis_s": analysis_s,
                "replay_s": replay_s,
                "total_s": time.perf_counter() - t_start,
            },
            records=records,
        )
