"""One step's rollouts: prompts -> G sampled answers each -> rewards -> advantages -> batch."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from meljax import losses
from meljax.batch import PolicyBatch, build_policy_batch
from meljax.buckets import bucket
from meljax.data import Problem
from meljax.sampling import SampleResult, SamplingParams


@dataclasses.dataclass
class Rollouts:
    """Host-side record of a step's rollouts.

    Attributes:
      problems: the N questions of the step.
      prompt_ids: N prompt token lists (as the policy saw them).
      sample: the sampler's output, rows ``i*G .. i*G+G-1`` for question ``i``.
      texts: N*G decoded answers (special tokens stripped).
      rewards: float32 ``[N, G]``.
      reasons: N*G verifier reasons (``correct``, ``mismatch``, ``no_answer`` ...).
      advantages: float32 ``[N, G]``.
      batch: the policy-gradient batch built from all of the above.
      timings: seconds per phase (``rollout``, ``reward``).
    """

    problems: list[Problem]
    prompt_ids: list[list[int]]
    sample: SampleResult
    texts: list[str]
    rewards: np.ndarray
    reasons: list[str]
    advantages: np.ndarray
    batch: PolicyBatch
    timings: dict[str, float]

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def metrics(self) -> dict[str, float]:
        r = self.rewards
        lengths = self.sample.lengths.astype(np.float64)
        correct = r > 0.5
        mixed = np.any(correct, axis=1) & ~np.all(correct, axis=1)
        out = {
            "reward_mean": float(r.mean()),
            "accuracy": float(correct.mean()),
            "pass_at_group": float(np.any(correct, axis=1).mean()),
            "mixed_group_fraction": float(mixed.mean()),
            "completion_len_mean": float(lengths.mean()),
            "completion_len_max": float(lengths.max()),
            "truncation_rate": float(self.sample.truncated.mean()),
            "no_answer_rate": float(np.mean([x == "no_answer" for x in self.reasons])),
            "advantage_abs_mean": float(np.abs(self.advantages).mean()),
        }
        return out


def run_rollouts(
    *,
    sampler,
    params,
    tokenizer,
    problems: Sequence[Problem],
    render_prompt: Callable[[str], str],
    sampling: SamplingParams,
    key: jax.Array,
    verify: Callable[[list[str], list[str]], list],
    advantage: str,
    max_prompt_tokens: int,
    pad_id: int,
    batch_multiple: int = 1,
) -> Rollouts:
    """Samples G answers per question with the current policy and scores them."""
    t0 = time.perf_counter()
    prompt_ids = []
    for p in problems:
        ids = tokenizer(render_prompt(p.question), add_special_tokens=False)["input_ids"]
        prompt_ids.append(list(ids[-max_prompt_tokens:]))
    sample = sampler.sample(params, prompt_ids, sampling, key)
    g = sampling.num_samples
    texts = tokenizer.batch_decode(
        [sample.completion(i) for i in range(len(sample))], skip_special_tokens=True
    )
    t1 = time.perf_counter()
    answers = [p.answer for p in problems for _ in range(g)]
    results = verify(texts, answers)
    rewards = np.asarray([r.score for r in results], np.float32).reshape(len(problems), g)
    reasons = [r.reason for r in results]
    adv = np.asarray(losses.compute_advantages(advantage, rewards), np.float32)
    t2 = time.perf_counter()
    completions = [sample.completion(i) for i in range(len(sample))]
    longest_prompt = max(len(p) for p in prompt_ids)
    # Fixed T per (prompt bucket, max_new_tokens): the update step then compiles rarely.
    max_len = bucket(longest_prompt) + sampling.max_new_tokens
    batch = build_policy_batch(
        [prompt_ids[i // g] for i in range(len(completions))],
        completions,
        advantages=adv.reshape(-1),
        rewards=rewards.reshape(-1),
        group_index=[i // g for i in range(len(completions))],
        old_logprobs=[sample.logprobs[i, : len(c)] for i, c in enumerate(completions)],
        pad_id=pad_id,
        batch_multiple=batch_multiple,
        max_len=max_len,
    )
    return Rollouts(
        problems=list(problems),
        prompt_ids=prompt_ids,
        sample=sample,
        texts=texts,
        rewards=rewards,
        reasons=reasons,
        advantages=adv,
        batch=batch,
        timings={"rollout": t1 - t0, "reward": t2 - t1},
    )
