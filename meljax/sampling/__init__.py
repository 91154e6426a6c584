"""Jitted grouped-rollout sampling (KV cache, ``lax.while_loop`` decode) and a text helper."""

from meljax.sampling.engine import Engine, Generation, Request, SamplerEngine
from meljax.sampling.generate import generate, sample_model
from meljax.sampling.sampler import (
    SampleOutput,
    Sampler,
    SampleResult,
    SamplingParams,
    filter_logits,
    sample_core,
    select_tokens,
    token_logprobs,
)

__all__ = [
    "Engine",
    "Generation",
    "Request",
    "SamplerEngine",
    "SampleOutput",
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "filter_logits",
    "generate",
    "sample_core",
    "sample_model",
    "select_tokens",
    "token_logprobs",
]
