"""``meljax sample``: sample completions of one or more prompts from a model.

Examples::

  meljax sample --model=demo --prompt="What is 7*8?" --temperature=0
  meljax sample --model=path/to/hf_folder --prompt=Hi --prompt=Bye --num_samples=4 --top_p=0.9

Prints each prompt's completions and the KV-cache memory estimate of the call. The work is
done by :func:`meljax.sampling.generate.sample_model`; this module only holds the flags.
"""

from __future__ import annotations

from absl import app, flags

from meljax.commands.common import clean_errors

_MODEL = flags.DEFINE_string(
    "model", "demo", "Hugging Face model folder, a .gguf file, or 'demo' (SmolLM2-135M-Instruct)."
)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Completion length limit (tokens).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_CACHE_DTYPE = flags.DEFINE_string("cache_dtype", "", "KV-cache dtype ('' = compute dtype).")
_CHAT = flags.DEFINE_boolean("chat", True, "Wrap each prompt in the tokenizer's chat template.")


def run() -> list[list[str]]:
    """Runs the command from the parsed flags; prints and returns the completions."""
    from meljax.sampling.generate import sample_model
    from meljax.sampling.select import SamplingParams

    if not _PROMPT.value:  # checked before the heavy imports of sample_model's work
        raise ValueError("give at least one --prompt")
    sampling = SamplingParams(
        max_new_tokens=_MAX_NEW_TOKENS.value,
        temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value,
        top_k=_TOP_K.value,
        num_samples=_NUM_SAMPLES.value,
    )
    return sample_model(
        _MODEL.value,
        _PROMPT.value,
        sampling,
        seed=_SEED.value,
        dtype=_DTYPE.value,
        cache_dtype=_CACHE_DTYPE.value or None,
        chat=_CHAT.value,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with clean_errors("sample"):
        run()


if __name__ == "__main__":
    app.run(main)
