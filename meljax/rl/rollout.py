"""Rollouts: prompts -> G completions each (the policy) -> rewards (the verifier) -> a batch.

:func:`run_rollouts` samples through the run's :class:`~meljax.sampling.policy.Policy` and
scores with :func:`score_groups`, which the held-out evaluation shares (the same verdicts).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from meljax.data import Problem
from meljax.rewards import RewardResult, Scorer, is_correct, is_mixed
from meljax.rl.advantages import ADV_EPS, advantages_with_eps
from meljax.rl.batch import PolicyBatch, build_policy_batch
from meljax.runtime.buckets import bucket
from meljax.sampling import SamplingParams
from meljax.sampling.engine import Request
from meljax.sampling.policy import Completion, Policy


def score_groups(
    verifier: Scorer, out: Sequence[Sequence[Completion]], answers: Sequence[str]
) -> tuple[list[list[RewardResult]], np.ndarray]:
    """Verdicts ``[N][G]`` and rewards float32 ``[N, G]`` of ``N`` groups of ``G`` completions
    (``answers[i]`` is the reference of group ``i``)."""
    g = len(out[0]) if len(out) else 0
    texts = [c.text for group in out for c in group]
    flat = verifier.score(texts, [a for a, group in zip(answers, out, strict=True) for _ in group])
    if len(flat) != len(texts):
        raise RuntimeError(f"verifier returned {len(flat)} results for {len(texts)} answers")
    results = [list(flat[i * g : (i + 1) * g]) for i in range(len(out))]
    rewards = np.asarray([x.score for x in flat], np.float32).reshape(len(out), g)
    return results, rewards


@dataclasses.dataclass
class Rollouts:
    """Host-side record of a step's rollouts: ``N`` questions x ``G`` answers, their verdicts,
    advantages and the policy-gradient batch (row ``i*G + g`` is answer ``g`` to question
    ``i``).

    Attributes:
      problems: the N questions of the step.
      prompt_ids: N prompt token lists (as the policy saw them).
      completions: ``[N][G]`` :class:`~meljax.sampling.Completion`.
      results: ``[N][G]`` verifier results.
      rewards: float32 ``[N, G]`` verdict rewards (unshaped: MEL's pairs and the metrics).
      advantages: float32 ``[N, G]``.
      batch: the policy-gradient batch built from all of the above.
      timings: ``{"rollout": sampling s, "reward": scoring s}`` over every sampling round.
      engine: the engine's counters of the (first) sampling run (``EngineStats``), or None.
      prompts_cut: prompts the policy cut to its limit (``meljax.sampling.policy.prompt_limit``).
      shaping_metrics: dynamic-sampling rounds and groups, the mean overlong penalty (only
        when either is on, so a plain run logs what it always logged).
    """

    problems: list[Problem]
    prompt_ids: list[list[int]]
    completions: list[list[Completion]]
    results: list[list[RewardResult]]
    rewards: np.ndarray
    advantages: np.ndarray
    batch: PolicyBatch
    timings: dict[str, float]
    engine: Any = None
    prompts_cut: int = 0
    shaping_metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def flat(self) -> list[Completion]:
        return [c for group in self.completions for c in group]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.flat()]

    def metrics(self) -> dict[str, float]:
        r = self.rewards
        flat = self.flat()
        lengths = np.asarray([c.num_tokens for c in flat], np.float64)
        reasons = [x.reason for group in self.results for x in group]
        correct = is_correct(r)
        mixed = is_mixed(r)
        stats = self.engine
        engine = {}
        if stats is not None:  # useful tokens / slot-steps of the rollout's engine run
            engine = {"slot_utilisation": float(stats.slot_utilisation)}
        return (
            engine
            | {
                "reward_mean": float(r.mean()),
                "accuracy": float(correct.mean()),
                "pass_at_group": float(np.any(correct, axis=1).mean()),
                "mixed_group_fraction": float(mixed.mean()),
                "completion_len_mean": float(lengths.mean()),
                "completion_len_max": float(lengths.max()),
                "truncation_rate": float(np.mean([c.truncated for c in flat])),
                "stop_string_rate": float(
                    np.mean([c.finish_reason == "stop_string" for c in flat])
                ),
                "no_answer_rate": float(np.mean([x == "no_answer" for x in reasons])),
                "verifier_timeout_rate": float(np.mean([x == "timeout" for x in reasons])),
                "advantage_abs_mean": float(np.abs(self.advantages).mean()),
                "rollout_tokens": float(lengths.sum()),
                "data/prompts_cut": float(self.prompts_cut),
            }
            | self.shaping_metrics
        )


def overlong_penalty(lengths: np.ndarray, max_new_tokens: int, buffer: int, penalty: float):
    """DAPO's soft overlong penalty, in tokens: 0 up to ``max_new_tokens - buffer``, then
    rising linearly to ``penalty`` at ``max_new_tokens`` (an answer cut by the limit).
    ``lengths`` any shape; float32 of the same shape; ``buffer`` 0 gives zeros."""
    lengths = np.asarray(lengths, np.float32)
    if buffer <= 0:
        return np.zeros_like(lengths)
    over = (lengths - (max_new_tokens - buffer)) / buffer
    return (penalty * np.clip(over, 0.0, 1.0)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Shaping:
    """What turns verdicts into the rewards advantages are computed from, and which groups a
    step keeps (``rollout.*`` of the config; defaults: none of it)."""

    overlong_buffer: int = 0  # tokens; 0 = no overlong penalty
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = False  # replace zero-advantage groups by further questions
    max_rounds: int = 1  # sampling rounds per step at most (dynamic_sampling)


def run_rollouts(
    *,
    policy: Policy,
    weights: Any,
    verifier: Scorer,
    problems: Sequence[Problem],
    sampling: SamplingParams,
    key: jax.Array,
    advantage: str,
    adv_eps: float = ADV_EPS,
    batch_multiple: int = 1,
    shaping: Shaping = Shaping(),
    more_problems: Callable[[], Sequence[Problem]] | None = None,
) -> Rollouts:
    """Samples G answers per question with the current policy, scores them, builds the batch.

    ``advantage`` / ``adv_eps``: the estimator and its std epsilon (``algorithm.advantage``,
    ``algorithm.adv_eps``). With ``shaping.dynamic_sampling``, groups whose answers all agree
    are replaced, in up to ``shaping.max_rounds - 1`` further rounds, by groups of the
    questions ``more_problems()`` returns (the next batch of the data iterator); the batch keeps
    ``len(problems)`` groups, informative ones first in sampling order, then zero-advantage
    ones if too few were found. Verdict rewards (``Rollouts.rewards``) stay unshaped: MEL's
    pairs and the metrics read them; advantages use the rewards less the overlong penalty.
    """
    n, g = len(problems), sampling.num_samples
    cut_before = policy.prompts_cut
    seconds = {"rollout": 0.0, "reward": 0.0}
    engine = None
    rounds: list[tuple[list[list[Completion]], list[list[RewardResult]], np.ndarray]] = []
    asked: list[tuple[Problem, list[int]]] = []
    informative: list[tuple[int, int]] = []
    batch_problems = list(problems)
    for r in range(shaping.max_rounds if shaping.dynamic_sampling else 1):
        if r:
            if more_problems is None or len(informative) >= n:
                break
            batch_problems = list(more_problems())
        ids = [policy.encode(p.question, sampling.max_new_tokens) for p in batch_problems]
        k = key if r == 0 else jax.random.fold_in(key, r)
        t0 = time.perf_counter()
        out = policy.generate(weights, [Request(tuple(p), sampling) for p in ids], key=k)
        t1 = time.perf_counter()
        results, rewards = score_groups(verifier, out, [p.answer for p in batch_problems])
        seconds["rollout"] += t1 - t0
        seconds["reward"] += time.perf_counter() - t1
        engine = engine or getattr(policy.engine, "last_stats", None)
        rounds.append((out, results, rewards))
        asked += [(p, i) for p, i in zip(batch_problems, ids, strict=True)]
        informative += [(r, i) for i in np.flatnonzero(is_mixed(rewards))]
    picks = [(0, i) for i in range(n)]
    if shaping.dynamic_sampling:
        rest = [(r, i) for r in range(len(rounds)) for i in range(len(rounds[r][0]))]
        taken = set(informative)
        rest = [x for x in rest if x not in taken]
        picks = (informative + rest)[:n]
    completions = [rounds[r][0][i] for r, i in picks]
    results = [rounds[r][1][i] for r, i in picks]
    rewards = np.stack([rounds[r][2][i] for r, i in picks]).astype(np.float32)
    offsets = np.cumsum([0] + [len(x[0]) for x in rounds])
    chosen = [asked[offsets[r] + i] for r, i in picks]
    prompt_ids = [ids for _, ids in chosen]
    lengths = np.asarray([[c.num_tokens for c in row] for row in completions], np.float32)
    penalty = overlong_penalty(
        lengths, sampling.max_new_tokens, shaping.overlong_buffer, shaping.overlong_penalty
    )
    adv = np.asarray(advantages_with_eps(advantage, rewards - penalty, adv_eps), np.float32)
    flat = [c for row in completions for c in row]
    # Fixed T per (prompt bucket, max_new_tokens): the update step then compiles rarely.
    max_len = bucket(max(len(p) for p in prompt_ids)) + sampling.max_new_tokens
    batch = build_policy_batch(
        [prompt_ids[i // g] for i in range(len(flat))],
        [c.tokens.tolist() for c in flat],
        advantages=adv.reshape(-1),
        rewards=rewards.reshape(-1),
        group_index=[i // g for i in range(len(flat))],
        old_logprobs=[c.logprobs for c in flat],
        pad_id=policy.pad_id,
        batch_multiple=batch_multiple,
        max_len=max_len,
    )
    sampled = {
        "rollout/rounds": float(len(rounds)),
        "rollout/groups_sampled": float(offsets[-1]),
        "rollout/groups_dropped": float(offsets[-1] - n),
        "rollout/overlong_penalty_mean": float(penalty.mean()),
    }
    return Rollouts(
        problems=[p for p, _ in chosen],
        prompt_ids=prompt_ids,
        completions=completions,
        results=results,
        rewards=rewards,
        advantages=adv,
        batch=batch,
        timings=seconds,
        engine=engine,
        prompts_cut=policy.prompts_cut - cut_before,
        shaping_metrics=sampled if (shaping.dynamic_sampling or shaping.overlong_buffer) else {},
    )
