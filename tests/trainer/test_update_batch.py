"""``run.update_batch``: the layout the update consumes (and ``meljax plan`` lowers)."""

import numpy as np
import pytest

from meljax.config.settings import base_config, settings
from meljax.rl.batch import build_policy_batch
from meljax.rl.shared_prompt import GroupedPolicyBatch
from meljax.trainer.run import update_batch


def _settings(questions: int, g: int, micro: int = 1, share: bool = True):
    cfg = base_config()
    cfg.rollout.num_questions, cfg.rollout.group_size = questions, g
    cfg.algorithm.num_microbatches, cfg.algorithm.share_prompt = micro, share
    return settings(cfg)


def _batch(questions: int, g: int, dp: int):
    rows = questions * g
    return build_policy_batch(
        [[1] * (5 + i // g) for i in range(rows)],
        [[2] * 3] * rows,
        advantages=np.ones(rows),
        rewards=np.ones(rows),
        group_index=np.arange(rows) // g,
        old_logprobs=None,
        batch_multiple=dp,
        max_len=64,
    )


@pytest.mark.parametrize(
    "questions, g, dp, micro, shared",
    [
        (4, 4, 1, 1, True),  # 16 rows either way
        (4, 4, 4, 1, True),  # 4 groups split over 4 devices
        (2, 4, 4, 1, False),  # 2 groups padded to 4 would be 16 answer rows against 8
        (8, 2, 4, 4, False),  # 8 groups padded to 16: 32 rows against 16
    ],
)
def test_grouped_only_when_it_adds_no_answer_rows(questions, g, dp, micro, shared):
    s = _settings(questions, g, micro)
    flat = _batch(questions, g, dp)
    out, got = update_batch(s, flat, dp)
    assert got == shared
    assert isinstance(out, GroupedPolicyBatch) == shared
    if not shared:
        assert out is flat
    else:
        assert np.shape(out.answers.seq.tokens)[0] * g <= np.shape(flat.seq.tokens)[0]


def test_share_prompt_off_keeps_the_flat_batch():
    flat = _batch(4, 4, 1)
    out, got = update_batch(_settings(4, 4, share=False), flat, 1)
    assert out is flat and not got
