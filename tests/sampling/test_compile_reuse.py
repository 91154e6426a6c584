"""A second call of the same workload compiles nothing: ``generate()`` (a fresh policy per
call) and the engine's tail, whose pool sizes depend on when samples end."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from meljax.sampling import ContinuousEngine, Request, SamplingParams, generate
from tests.sampling.test_sampling import PAD, tiny_model

COMPILES = [0]  # XLA compilations in this process (backend compiles)


def _count(event: str, seconds: float, **_) -> None:
    if event.endswith("backend_compile_duration"):
        COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count)


def compiles_in(fn, *args, **kw) -> int:
    before = COMPILES[0]
    fn(*args, **kw)
    return COMPILES[0] - before


@pytest.fixture(scope="module")
def tok():
    from meljax.models.tokenizer import make_tiny_tokenizer

    return make_tiny_tokenizer()


def test_second_generate_call_of_the_same_buckets_compiles_nothing(tok):
    """``generate()`` twice: other prompts of other lengths in the same prompt bucket, another
    seed. The second call builds a fresh policy and engine and compiles no program (the
    weights' decode layout included)."""
    from meljax.models import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        eos_token_id=tok.eos_token_id,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    run = dict(num_samples=3, max_new_tokens=12, temperature=1.0, chat=False)
    first = ["1 plus 1 is", "2 plus 2"]
    second = ["3 plus 4 is what", "5 plus"]
    compiles_in(generate, model, tok, first, seed=0, **run)
    assert compiles_in(generate, model, tok, second, seed=1, **run) == 0


def test_tail_sizes_are_compiled_at_the_first_shrink():
    """8 slots, no stop id: the first call's tail moves 3 live samples into 4 slots; the
    second call's (1 live sample) into 2, a size the first never ran. The first shrink
    compiled every tail size, so the second call compiles nothing."""
    graphdef, params = nnx.split(tiny_model("llama"))
    eng = ContinuousEngine(graphdef, stop_token_ids=[], pad_id=PAD, max_slots=8, segment_steps=2)
    eng.shrink_tail = True

    def call(prompts, long, seed):
        reqs = [
            Request(prompts[0], SamplingParams(20, temperature=1.0, num_samples=long)),
            Request(prompts[1], SamplingParams(2, temperature=1.0, num_samples=8 - long)),
        ]
        return eng.generate(params, reqs, jax.random.key(seed))

    compiles_in(call, ((5, 6, 7), (8, 9)), 3, 0)
    assert set(eng.last_stats.pools) == {8, 4}
    assert compiles_in(call, ((5, 6, 7, 8, 9), (1, 2, 3, 4)), 1, 1) == 0
    assert set(eng.last_stats.pools) == {8, 2}
