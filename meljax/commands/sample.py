"""``meljax sample``: sample completions of one or more prompts from a model.

Examples::

  meljax sample --prompt="What is 7 plus 8?" --config.rollout.temperature=0
  meljax sample --config.model.path=path/to/hf_folder --config.data.instruction=none \\
      --prompt=Hi --prompt=Bye --num_samples=4 --config.rollout.top_p=0.9

The settings are a training config's, read the same way as ``meljax train`` reads them:
``--config`` (a config file or a shipped config's name; default: the demo) and
``--config.SECTION.FIELD=VALUE`` overrides. A prompt is rendered as the config renders a
training question (``data``: prompt_template, instruction, system_prompt, bos,
max_prompt_tokens, stop_strings; ``--config.data.instruction=none`` sends it as typed) and
sampled as a rollout is (``rollout``: max_new_tokens, temperature (0 = greedy), top_p, top_k,
cache_dtype, max_slots, ...), from ``model`` on ``mesh`` with ``seed``.

Prints each prompt's completions and the KV-cache memory estimate of the call. The work is
done by :func:`meljax.sampling.generate.sample_model`; this module only holds the flags.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from meljax.commands.common import clean_errors
from meljax.commands.config_files import shipped

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    shipped("demo"),
    "Config file (configs/*.py or a shipped name): the model, prompt rendering (data), "
    "sampling and engine (rollout), mesh and seed.",
    lock_config=True,
)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")


def run() -> list[list[str]]:
    """Runs the command from the parsed flags; prints and returns the completions."""
    if not _PROMPT.value:  # checked before the heavy imports of sample_model's work
        raise ValueError("give at least one --prompt")
    from meljax.sampling.generate import sample_model

    return sample_model(_CONFIG.value, _PROMPT.value, num_samples=_NUM_SAMPLES.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with clean_errors("sample"):
        run()


if __name__ == "__main__":
    app.run(main)
