"""Jitted grouped-rollout sampling (KV cache, ``lax.while_loop`` decode) and a text helper."""

from meljax.sampling.generate import encode_prompts, generate, sample_model, stop_token_ids
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
    "SampleOutput",
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "encode_prompts",
    "filter_logits",
    "generate",
    "sample_core",
    "sample_model",
    "select_tokens",
    "stop_token_ids",
    "token_logprobs",
]
