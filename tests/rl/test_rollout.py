"""Rollout shaping: DAPO's overlong penalty in tokens and dynamic sampling (rl/rollout.py),
and the same options through build_run / step on the tiny model."""

from __future__ import annotations

import importlib

import jax
import numpy as np
import pytest

from meljax.data import Problem
from meljax.rewards import RewardResult
from meljax.rl.advantages import advantages_with_eps
from meljax.rl.rollout import Shaping, overlong_penalty, run_rollouts
from meljax.sampling import SamplingParams
from meljax.sampling.policy import Completion

MAX_NEW = 32


class ScriptedPolicy:
    """Answers by question: ``script[question] = [(text, num_tokens), ...]`` (G of them)."""

    pad_id = 0
    prompts_cut = 0
    engine = None

    def __init__(self, script):
        self.script, self.by_ids = script, {}

    def encode(self, question, max_new_tokens=0):
        ids = [3 + len(self.by_ids) % 50, 7]
        self.by_ids[tuple(ids)] = question
        return ids

    def generate(self, weights, requests, key=None, progress=None):
        out = []
        for r in requests:
            rows = []
            for text, n in self.script[self.by_ids[tuple(r.prompt_ids)]]:
                reason = "length" if n >= r.sampling.max_new_tokens else "stop"
                tokens = np.arange(1, n + 1, dtype=np.int32)
                rows.append(Completion(tokens, np.zeros(n, np.float32), text, reason))
            out.append(rows)
        return out


class ExactMatch:
    def score(self, completions, answers):
        return [
            RewardResult(float(c == a), "correct" if c == a else "wrong", None)
            for c, a in zip(completions, answers, strict=True)
        ]


def _sampling(g):
    return SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, num_samples=g)


def test_overlong_penalty_by_hand():
    # max 32, buffer 8: free up to 24 tokens, then 1/8 of the penalty per token
    got = overlong_penalty(np.array([10, 24, 25, 28, 32]), MAX_NEW, 8, 0.5)
    np.testing.assert_allclose(got, [0, 0, 0.0625, 0.25, 0.5])
    assert not overlong_penalty(np.array([32]), MAX_NEW, 0, 1.0).any()  # off


def test_overlong_penalty_shapes_advantages_not_verdicts():
    script = {"q": [("1", 10), ("1", 28), ("1", 32), ("0", 5)]}
    ro = run_rollouts(
        policy=ScriptedPolicy(script),
        weights=None,
        verifier=ExactMatch(),
        problems=[Problem("a", "q", "1")],
        sampling=_sampling(4),
        key=jax.random.key(0),
        advantage="grpo",
        shaping=Shaping(overlong_buffer=8, overlong_penalty=1.0),
    )
    np.testing.assert_array_equal(ro.rewards, [[1, 1, 1, 0]])  # verdicts unshaped
    shaped = np.array([[1.0, 0.5, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(ro.advantages, advantages_with_eps("grpo", shaped, 1e-6), atol=1e-6)
    assert ro.metrics()["rollout/overlong_penalty_mean"] == pytest.approx(1.5 / 4)


def test_dynamic_sampling_replaces_zero_advantage_groups():
    script = {
        "all right": [("1", 4), ("1", 4)],
        "mixed 1": [("1", 4), ("0", 4)],
        "mixed 2": [("0", 4), ("1", 4)],
        "all wrong": [("0", 4), ("0", 4)],
    }
    more = iter([[Problem("c", "mixed 2", "1"), Problem("d", "all wrong", "1")]])
    kwargs = dict(
        verifier=ExactMatch(),
        sampling=_sampling(2),
        key=jax.random.key(0),
        advantage="grpo",
    )
    first = [Problem("a", "all right", "1"), Problem("b", "mixed 1", "1")]
    ro = run_rollouts(
        policy=ScriptedPolicy(script),
        weights=None,
        problems=first,
        shaping=Shaping(dynamic_sampling=True, max_rounds=3),
        more_problems=lambda: next(more),
        **kwargs,
    )
    assert [p.id for p in ro.problems] == ["b", "c"]  # informative groups, in sampling order
    assert np.abs(ro.advantages).min() > 0
    m = ro.metrics()
    assert (m["rollout/rounds"], m["rollout/groups_sampled"], m["rollout/groups_dropped"]) == (
        2,
        4,
        2,
    )
    assert len(ro.batch.advantages) == 4  # 2 groups x G=2: the shape of a plain step
    # too few informative groups within max_rounds: topped up with zero-advantage ones
    ro = run_rollouts(
        policy=ScriptedPolicy(script),
        weights=None,
        problems=[Problem("a", "all right", "1"), Problem("d", "all wrong", "1")],
        shaping=Shaping(dynamic_sampling=True, max_rounds=1),
        more_problems=lambda: pytest.fail("max_rounds=1 draws no further questions"),
        **kwargs,
    )
    assert [p.id for p in ro.problems] == ["a", "d"]
    # off: the batch is what was asked, no extra metrics
    ro = run_rollouts(policy=ScriptedPolicy(script), weights=None, problems=first, **kwargs)
    assert [p.id for p in ro.problems] == ["a", "b"] and "rollout/rounds" not in ro.metrics()


def test_build_run_and_step_with_dynamic_sampling(tmp_path):
    """The tiny config through build_run / step in-process: extra rounds draw the next
    batches of the run's data iterator (whose state is what a checkpoint saves)."""
    from meljax.trainer.run import build_run, step

    cfg = importlib.import_module("meljax.configs.tiny").get_config()
    cfg.unlock()
    cfg.mel.enabled = False
    cfg.rollout.dynamic_sampling = True
    cfg.rollout.max_sampling_rounds = 3
    cfg.rollout.overlong_buffer = 4
    cfg.lock()
    run = build_run(cfg, str(tmp_path))
    try:
        state = run.state
        for n in (1, 2):
            before = run.data_iter.get_state()
            problems = next(run.data_iter)
            key = jax.random.fold_in(jax.random.key(cfg.seed), n)
            state, record = step(run, state, problems, key, n)
            m = record.metrics
            rounds = int(m["rollout/rounds"])
            assert 1 <= rounds <= 3 and m["rollout/groups_sampled"] == 4 * rounds
            assert m["rollout/groups_dropped"] == 4 * (rounds - 1)
            assert np.isfinite(m["train/loss"]) and "rollout/overlong_penalty_mean" in m
            # the iterator moved by one batch per round
            after = run.data_iter.get_state()
            run.data_iter.set_state(before)
            for _ in range(rounds):
                next(run.data_iter)
            assert run.data_iter.get_state() == after
    finally:
        run.close()
