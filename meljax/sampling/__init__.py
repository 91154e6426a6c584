"""Sampling: the continuous-batching engine, token selection, and a text helper.

The static-batch reference sampler the engine is tested and benchmarked against lives in
``tests/reference_sampler.py``; the product samples through ``ContinuousEngine``.
"""

from meljax.sampling.engine import (
    Completion,
    ContinuousEngine,
    Engine,
    EngineStats,
    InferenceWeights,
    Request,
)
from meljax.sampling.generate import generate, sample_model
from meljax.sampling.select import (
    SamplingParams,
    filter_logits,
    select_tokens,
    select_tokens_rows,
    token_logprobs,
)

__all__ = [
    "ContinuousEngine",
    "Engine",
    "Completion",
    "EngineStats",
    "InferenceWeights",
    "Request",
    "SamplingParams",
    "filter_logits",
    "generate",
    "sample_model",
    "select_tokens",
    "select_tokens_rows",
    "token_logprobs",
]
