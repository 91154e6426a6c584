"""Rollouts: prompts -> G completions each (the policy) -> rewards (the verifier) -> a batch.

:func:`sample_and_score` is the one rollout, shared by training (G = ``rollout.group_size``)
and evaluation (G = 1 greedy, G = k sampled): the same prompts, stops and verdicts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from meljax.data import Problem
from meljax.rewards import RewardResult, Scorer, is_correct
from meljax.rl import objective as losses
from meljax.rl.batch import PolicyBatch, build_policy_batch
from meljax.runtime.buckets import bucket
from meljax.sampling import SamplingParams
from meljax.sampling.engine import Request
from meljax.sampling.policy import Completion, Policy


@dataclasses.dataclass
class Groups:
    """``N`` prompts x ``G`` completions and their verdicts.

    Attributes:
      completions: ``[N][G]`` :class:`~meljax.sampling.policy.Completion`.
      results: ``[N][G]`` verifier results.
      rewards: float32 ``[N, G]``.
      seconds: ``{"rollout": sampling time, "reward": scoring time}``.
      engine: the engine's counters of the sampling run (``EngineStats``), when it has them.
    """

    completions: list[list[Completion]]
    results: list[list[RewardResult]]
    rewards: np.ndarray
    seconds: dict[str, float]
    engine: Any = None

    def flat(self) -> list[Completion]:
        return [c for group in self.completions for c in group]


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


def sample_and_score(
    policy: Policy,
    verifier: Scorer,
    prompt_ids: Sequence[Sequence[int]],
    answers: Sequence[str],
    sampling: SamplingParams,
    key: jax.Array,
    progress: Callable[[int], None] | None = None,
) -> Groups:
    """``sampling.num_samples`` completions per prompt from ``policy``, scored by ``verifier``."""
    t0 = time.perf_counter()
    out = policy.generate(
        [Request(tuple(p), sampling) for p in prompt_ids], key=key, progress=progress
    )
    t1 = time.perf_counter()
    results, rewards = score_groups(verifier, out, answers)
    seconds = {"rollout": t1 - t0, "reward": time.perf_counter() - t1}
    return Groups(out, results, rewards, seconds, getattr(policy.engine, "last_stats", None))


@dataclasses.dataclass
class Rollouts:
    """Host-side record of a step's rollouts.

    Attributes:
      problems: the N questions of the step.
      prompt_ids: N prompt token lists (as the policy saw them).
      groups: the completions and their verdicts (rows ``i*G + g`` in :meth:`Groups.flat`).
      advantages: float32 ``[N, G]``.
      batch: the policy-gradient batch built from all of the above.
      prompts_cut: prompts the policy cut to its limit (``meljax.sampling.policy.prompt_limit``).
    """

    problems: list[Problem]
    prompt_ids: list[list[int]]
    groups: Groups
    advantages: np.ndarray
    batch: PolicyBatch
    prompts_cut: int = 0

    @property
    def rewards(self) -> np.ndarray:
        return self.groups.rewards

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.groups.flat()]

    @property
    def timings(self) -> dict[str, float]:
        return self.groups.seconds

    def metrics(self) -> dict[str, float]:
        r = self.rewards
        flat = self.groups.flat()
        lengths = np.asarray([c.num_tokens for c in flat], np.float64)
        reasons = [x.reason for group in self.groups.results for x in group]
        correct = is_correct(r)
        mixed = np.any(correct, axis=1) & ~np.all(correct, axis=1)
        stats = self.groups.engine
        engine = {}
        if stats is not None:  # useful tokens / slot-steps of the rollout's engine run
            engine = {"slot_utilisation": float(stats.slot_utilisation)}
        return engine | {
            "reward_mean": float(r.mean()),
            "accuracy": float(correct.mean()),
            "pass_at_group": float(np.any(correct, axis=1).mean()),
            "mixed_group_fraction": float(mixed.mean()),
            "completion_len_mean": float(lengths.mean()),
            "completion_len_max": float(lengths.max()),
            "truncation_rate": float(np.mean([c.truncated for c in flat])),
            "stop_string_rate": float(np.mean([c.finish_reason == "stop_string" for c in flat])),
            "no_answer_rate": float(np.mean([x == "no_answer" for x in reasons])),
            "verifier_timeout_rate": float(np.mean([x == "timeout" for x in reasons])),
            "advantage_abs_mean": float(np.abs(self.advantages).mean()),
            "rollout_tokens": float(lengths.sum()),
            "data/prompts_cut": float(self.prompts_cut),
        }


def run_rollouts(
    *,
    policy: Policy,
    verifier: Scorer,
    problems: Sequence[Problem],
    sampling: SamplingParams,
    key: jax.Array,
    advantage: str,
    adv_eps: float = losses.ADV_EPS,
    batch_multiple: int = 1,
) -> Rollouts:
    """Samples G answers per question with the current policy, scores them, builds the batch.

    ``advantage`` / ``adv_eps``: the estimator and its std epsilon (``algorithm.advantage``,
    ``algorithm.adv_eps``)."""
    cut_before = policy.prompts_cut
    prompt_ids = [policy.encode(p.question, sampling.max_new_tokens) for p in problems]
    groups = sample_and_score(
        policy, verifier, prompt_ids, [p.answer for p in problems], sampling, key
    )
    g = sampling.num_samples
    adv = np.asarray(losses.advantages_with_eps(advantage, groups.rewards, adv_eps), np.float32)
    flat = groups.flat()
    # Fixed T per (prompt bucket, max_new_tokens): the update step then compiles rarely.
    max_len = bucket(max(len(p) for p in prompt_ids)) + sampling.max_new_tokens
    batch = build_policy_batch(
        [prompt_ids[i // g] for i in range(len(flat))],
        [c.tokens.tolist() for c in flat],
        advantages=adv.reshape(-1),
        rewards=groups.rewards.reshape(-1),
        group_index=[i // g for i in range(len(flat))],
        old_logprobs=[c.logprobs for c in flat],
        pad_id=policy.pad_id,
        batch_multiple=batch_multiple,
        max_len=max_len,
    )
    return Rollouts(list(problems), prompt_ids, groups, adv, batch, policy.prompts_cut - cut_before)
