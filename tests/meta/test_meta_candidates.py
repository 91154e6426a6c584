"""Several analyses per contrastive pair (``mel.analyses_per_pair``): each candidate is counted
as generated, filtered and replayed on its own, and only those whose replay passes reach the
NLL term (the denominator of the retention ratio counts them all)."""

from __future__ import annotations

import numpy as np

from meljax.meta import MetaConfig, formats
from tests.conftest import scripted_result
from tests.meta.test_meta_compact import LEAKY, LESSON, TOK, compact_step

OTHER = (
    "Rule: When I add two numbers, I write the sum and then stop.\n"
    "Mistake: The wrong answer kept writing after the sum."
)


class Candidates:
    """Sampler double: the k-th sample of an analysis prompt gets ``analyses[k]``; the replay
    of a lesson gets ``replays[lesson's first rule word]`` (the rule's own text decides)."""

    def __init__(self, analyses: list[str], replays: dict[str, str]):
        self.analyses, self.replays, self.replayed = analyses, replays, []
        self.samples: list[int] = []
        self.replay_sampling = None

    def sample(self, params, prompts, sampling, key):
        m, rows = sampling.max_new_tokens, []
        for p in prompts:
            text = TOK.decode(list(p))
            if "Note to self:" in text:
                lesson = next(a for a in self.analyses if a.splitlines()[0] in text)
                self.replayed.append(lesson)
                self.replay_sampling = sampling
                replies = [self.replays[lesson]] * sampling.num_samples
            else:
                self.samples.append(sampling.num_samples)
                replies = self.analyses[: sampling.num_samples]
            for reply in replies:
                reply = reply.removeprefix(formats.COMPACT_PREFIX)  # the prompt ends with it
                ids = TOK.encode(reply, add_special_tokens=False) + [TOK.eos_token_id]
                rows.append(ids[:m])
        return scripted_result(rows, m)


def run_step(engine: Candidates, analyses_per_pair: int, replay_temperature: float = 1.0):
    return compact_step(
        engine, analyses_per_pair=analyses_per_pair, replay_temperature=replay_temperature
    )


def test_each_candidate_is_counted_replayed_and_kept_on_its_own():
    engine = Candidates([LESSON, OTHER], {LESSON: "So 8.", OTHER: "So 9."})
    meta = run_step(engine, analyses_per_pair=2)
    c = meta.counts
    assert engine.samples == [2]  # one analysis call, two samples of the one pair's prompt
    assert (c.pairs, c.generated, c.replayed, c.kept) == (1, 2, 2, 1)
    assert engine.replayed == [LESSON, OTHER]  # both replayed, each with its own lesson
    assert meta.retention_ratio == 0.5  # the failed candidate stays in the denominator
    assert [r["status"] for r in meta.records] == ["kept", "replay_failed"]
    assert meta.records[0]["lesson"] == "When I add two numbers, I count on from the larger one."
    # only the kept candidate is an NLL row, with the pair's prompt as its context
    rows = np.nonzero(meta.batch.weight)[0]
    assert len(rows) == 1
    target = meta.batch.tokens[rows[0]][meta.batch.loss_mask[rows[0]] > 0]
    assert TOK.decode(list(target), skip_special_tokens=True) == LESSON.removeprefix(
        formats.COMPACT_PREFIX
    )
    assert c.analysis_tokens > c.kept_tokens > 0


def test_a_leaking_candidate_is_dropped_before_replay_and_counted():
    engine = Candidates([LEAKY, LESSON], {LESSON: "So 8.", LEAKY: "So 8."})
    meta = run_step(engine, analyses_per_pair=2)
    c = meta.counts
    assert (c.generated, c.leak, c.replayed, c.kept) == (2, 1, 1, 1)
    assert engine.replayed == [LESSON]  # the leak never reaches the replay
    assert [r["status"] for r in meta.records] == ["leak", "kept"]
    assert int((meta.batch.weight > 0).sum()) == 1


def test_one_analysis_per_pair_by_default():
    assert MetaConfig().analyses_per_pair == 1
    engine = Candidates([LESSON, OTHER], {LESSON: "So 8.", OTHER: "So 8."})
    meta = run_step(engine, analyses_per_pair=1)
    assert engine.samples == [1] and meta.counts.generated == 1 and meta.counts.kept == 1


def test_greedy_replay_is_one_answer_per_candidate():
    engine = Candidates([LESSON, OTHER], {LESSON: "So 8.", OTHER: "So 8."})
    meta = run_step(engine, analyses_per_pair=2, replay_temperature=0.0)
    assert meta.counts.replayed == 2 and meta.counts.kept == 2
    # the spec's replay: ONE answer per analysis (not the analysis pass's two), here greedy
    assert engine.replay_sampling.num_samples == 1
    assert engine.replay_sampling.temperature == 0.0
    assert engine.replay_sampling.max_new_tokens == 16
