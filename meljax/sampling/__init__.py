"""Sampling: the continuous-batching engine, token selection, and a text helper.

``Sampler`` / ``SamplerEngine`` (the static-batch sampler) remain as the reference the engine
is tested and benchmarked against; the product samples through ``ContinuousEngine``.
"""

from meljax.sampling.engine import (
    ContinuousEngine,
    Engine,
    EngineStats,
    Generation,
    InferenceWeights,
    Request,
)
from meljax.sampling.generate import generate, sample_model
from meljax.sampling.sampler import (
    SampleOutput,
    Sampler,
    SamplerEngine,
    SampleResult,
    sample_core,
)
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
    "EngineStats",
    "Generation",
    "InferenceWeights",
    "Request",
    "SampleOutput",
    "SampleResult",
    "Sampler",
    "SamplerEngine",
    "SamplingParams",
    "filter_logits",
    "generate",
    "sample_core",
    "sample_model",
    "select_tokens",
    "select_tokens_rows",
    "token_logprobs",
]
