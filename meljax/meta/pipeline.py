"""One step of meta-experience generation (docs/mel.md, steps 4 to 7) and its NLL batch.

:meth:`MetaExperiencePipeline.run` takes a step's rollouts and rewards and

1. draws contrastive pairs from the mixed groups (:mod:`meljax.meta.pairs`);
2. fills the analysis instruction for every pair (incorrect answer first, answers shortened in
   the middle to fit ``analysis_max_prompt_tokens``) and samples ``analyses_per_pair``
   analyses per pair (the paper: one) from the current policy, in one batched sampler call
   (the "analysis pass"); each is an analysis of its own from here on;
3. parses each analysis into its sections with the parser of ``mel.analysis_format``
   (:mod:`meljax.meta.formats`; for the log and the quality filter);
4. drops empty, truncated, malformed (a section or the rule missing) and answer-leaking
   analyses (:mod:`meljax.meta.filters`);
5. replays the survivors: one batched sampler call with the replay prompt, one answer each,
   verified against the ground truth; an analysis is *kept* when its replay answer is correct;
6. builds the NLL :class:`~meljax.rl.batch.SequenceBatch`: context = the analysis prompt token ids
   exactly as the sampler saw them (no loss), target = the analysis token ids as sampled,
   stop token included (loss; a compact analysis through its lesson, then a stop token, see
   :mod:`meljax.meta.trim`). Its shape is fixed by the config, so the update step compiles
   once; a step with nothing kept gives an all-padding batch (weight 0, loss term 0);
7. appends one JSON record per generated analysis to ``meta_experiences.jsonl`` (chief only).

All sampling goes through the run's :class:`meljax.sampling.policy.Policy` (same rendering, BOS, stop ids
and stop strings as the rollouts) and all scoring through its :class:`meljax.rewards.Verifier`
(the same on every host). Pairs, filters and survivors are pure functions of values every host
shares, so the jitted calls they shape agree across hosts by construction.

Retention ratio (the quantity the paper plots): ``kept / generated``, where *generated*
counts every analysis the policy produced this step (empty, truncated and leaking ones
included). ``replay_pass_ratio = kept / replayed`` is logged too: the share of analyses that
survived the filters and then helped the replay. Both are 0 in a step without analyses.

A step without any mixed group skips everything: no sampler call, all counts 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from meljax.meta import filters, pairs, templates, trim
from meljax.meta import records as meta_records
from meljax.meta.formats import get_format
from meljax.meta.results import MetaCounts, MetaResult, ProblemLike
from meljax.meta.settings import MetaConfig
from meljax.rewards.pool import Scorer
from meljax.rewards.verify import is_correct
from meljax.rl.batch import SequenceBatch, build_sequence_batch
from meljax.runtime import files
from meljax.runtime.buckets import DEFAULT_LENGTH_BUCKETS

__all__ = [
    "META_LOG_FILE",
    "MetaConfig",
    "MetaCounts",
    "MetaExperiencePipeline",
    "MetaResult",
    "ProblemLike",
]

META_LOG_FILE = "meta_experiences.jsonl"


class MetaExperiencePipeline:
    """Generates, filters, validates and batches meta-experiences, one call per step.

    Args:
      policy: the run's :class:`meljax.sampling.policy.Policy` (its current weights are sampled). Its
        sampler's prompt limit must admit ``analysis_max_prompt_tokens``: a prompt cut by the
        sampler would no longer be the NLL context.
      verifier: the run's :class:`meljax.rewards.Verifier` (anything with its ``score``).
      config: the knobs.
      workdir: where ``meta_experiences.jsonl`` is appended to (chief only); ``None``: no file.
      is_chief: only the chief writes the log.
      writer: a custom ``records -> None`` sink, replacing the file (still chief only).
    """

    def __init__(
        self,
        *,
        policy: Any,
        verifier: Scorer,
        config: MetaConfig = MetaConfig(),
        workdir: str | None = None,
        is_chief: bool = True,
        writer: Callable[[list[dict[str, Any]]], None] | None = None,
    ):
        limit = policy.max_prompt_len
        if limit is not None and limit < config.analysis_max_prompt_tokens:
            raise ValueError(
                f"the sampler cuts prompts to max_prompt_len={limit} tokens, below "
                f"MetaConfig.analysis_max_prompt_tokens={config.analysis_max_prompt_tokens}; "
                f"raise the sampler's limit or lower the analysis prompt limit"
            )
        self.policy = policy
        self.verifier = verifier
        self.config = config
        self.cutter = templates.TokenCutter(policy.tokenizer)
        self.format = get_format(config.analysis_format)
        self.analysis_template = templates.load_template(
            config.analysis_template or None,
            default=self.format.analysis_template,
            required=templates.ANALYSIS_FIELDS,
            what="analysis_template",
        )
        self.replay_template = templates.load_template(
            config.replay_template or None,
            default=self.format.replay_template,
            required=templates.REPLAY_FIELDS,
            what="replay_template",
        )
        if writer is None and workdir is not None:
            log = files.path(workdir, META_LOG_FILE)

            def writer(records):
                files.append_jsonl(log, records)

        self.writer = writer if is_chief else None
        self.pad_id = policy.pad_id

    # -- helpers

    def _render_analysis(self, message: str) -> str:
        """The analysis prompt: the chat-rendered instruction, then the format's reply prefix."""
        return self.policy.render_message(message) + self.format.reply_prefix

    def _analysis(self, completion: Any) -> trim.Analysis:
        """A sampled analysis as the filters see it: the reply prefix and the sampled text
        (compact ones cut to their lesson); the NLL target is the sampled tokens only."""
        ids = [int(t) for t in completion.tokens]
        prefix = self.format.reply_prefix
        text = prefix + completion.text
        if self.format.name != "compact":
            return trim.Analysis(ids, text, completion.truncated, len(ids))
        stops = self.policy.stop_ids or (self.policy.tokenizer.eos_token_id,)
        return trim.trim_compact(
            ids,
            text,
            completion.truncated,
            decode=lambda t: prefix + self.policy.decode(t),
            stop_id=stops[0],
        )

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
            min_rows=cfg.nll_min_rows(num_questions),
            batch_multiple=cfg.nll_batch_multiple,
            max_len=cfg.nll_length,
        )

    # -- the step

    def run(
        self,
        weights: Any,
        step: int,
        problems: Sequence[ProblemLike],
        completions: Sequence[str],
        rewards: Sequence[float] | np.ndarray,
        group_size: int,
        key: jax.Array,
    ) -> MetaResult:
        """Runs steps 4 to 7 of docs/mel.md for one training step.

        Args:
          weights: the policy's decode weights of this step (``Policy.prepare``).
          step: the training step (seeds pair selection; written to the log).
          problems: the step's ``N`` questions (``.id``, ``.question``, ``.answer``).
          completions: ``N*G`` decoded answers; row ``i*G + g`` answers question ``i``.
          rewards: ``N*G`` (or ``[N, G]``) rewards of those answers.
          group_size: ``G``.
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
        mixed = pairs.mixed_groups(r)
        chosen = pairs.select_pairs(
            r, max_pairs_per_query=cfg.max_pairs_per_query, rng=pairs.pair_rng(cfg.seed, step)
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
                render=self._render_analysis,
                encode=self.policy.encode_text,
                cutter=self.cutter,
                max_prompt_tokens=cfg.analysis_max_prompt_tokens,
                min_answer_tokens=cfg.min_answer_tokens,
            )
            if prompt is not None:
                filled.append((pair, prompt))
        counts["too_long"] = len(chosen) - len(filled)
        counts["shortened"] = sum(1 for _, p in filled if any(p.omitted))
        key_analysis, key_replay = jax.random.split(key)
        analyses: list[trim.Analysis] = []
        if filled:
            out = self.policy.generate(
                weights, [p.ids for _, p in filled], cfg.analysis_sampling(), key_analysis
            )
            analyses = [self._analysis(c) for group in out for c in group]
            # one entry per analysis: a pair's candidates share its prompt
            filled = [f for f, group in zip(filled, out, strict=True) for _ in group]
        counts["generated"] = len(filled)
        analysis_s = time.perf_counter() - t0

        # Parse for the log, then filter (docs/mel.md, "Filters") (the record's "malformed" is
        # the quality flag whatever the analysis's fate; its "status" says why it was dropped).
        records: list[dict[str, Any]] = []
        survivors: list[int] = []
        for k, ((pair, prompt), a) in enumerate(zip(filled, analyses, strict=True)):
            prob = problems[pair.question]
            reason = filters.filter_reason(
                a.text,
                truncated=a.truncated,
                answer=prob.answer,
                check_leaks=cfg.filter_leaks,
                check_malformed=cfg.filter_malformed,
                analysis_format=cfg.analysis_format,
                instruction=self.analysis_template,
                check_copies=cfg.filter_copies,
            )
            inc_row, cor_row = pair.rows(group_size)
            records.append(
                meta_records.analysis_record(
                    step=step,
                    problem=prob,
                    pair=pair,
                    answers=(completions[inc_row], completions[cor_row]),
                    analysis=a,
                    parsed=self.format.parse(a.text),
                    analysis_format=cfg.analysis_format,
                    prompt=prompt,
                    reason=reason,
                    template=self.analysis_template,
                )
            )
            if reason == "ok":
                survivors.append(k)
        for reason in filters.FILTER_REASONS:
            counts[reason] = sum(1 for rec in records if rec["status"] == reason)
        counts["replayed"] = len(survivors)

        # Replay validation (docs/mel.md, "Replay"), one batched sampler call.
        t0 = time.perf_counter()
        if survivors:
            replay_prompts = []
            for k in survivors:
                question = problems[filled[k][0].question].question
                user = templates.fill_replay_prompt(
                    analyses[k].text,
                    question,
                    template=self.replay_template,
                    instruction=cfg.replay_instruction,
                )
                replay_prompts.append(self.policy.encode_message(user))
            out = self.policy.generate(weights, replay_prompts, cfg.replay_sampling(), key_replay)
            replay_texts = [c.text for (c,) in out]
            answers = [problems[filled[k][0].question].answer for k in survivors]
            results = self.verifier.score(replay_texts, answers)
            if len(results) != len(survivors):
                raise RuntimeError(
                    f"verifier returned {len(results)} results for {len(survivors)} replays"
                )
            for j, k in enumerate(survivors):
                ok = is_correct(results[j].score)
                records[k].update(
                    replay_text=replay_texts[j],
                    replay_extracted=results[j].extracted,
                    replay_score=float(results[j].score),
                    replay_failed=not ok,
                    status="kept" if ok else "replay_failed",
                    kept=ok,
                )
        replay_s = time.perf_counter() - t0

        kept = [k for k in survivors if records[k]["kept"]]
        counts["kept"] = len(kept)
        counts["analysis_tokens"] = sum(a.sampled_tokens for a in analyses)
        counts["kept_tokens"] = sum(len(analyses[k].ids) for k in kept)
        batch = self._batch([filled[k][1].ids for k in kept], [analyses[k].ids for k in kept], n)
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
