"""A random tiny model (about 0.1M parameters) with a character tokenizer: tests, smoke runs."""

from meljax.config.settings import base_config


def get_config():
    c = base_config()
    c.total_steps = 3
    c.model.random_init = True  # no files: architecture below, tokenizer built in code
    c.model.random.model_type = "llama"
    c.model.random.hidden_size = 32
    c.model.random.intermediate_size = 64
    c.model.random.num_layers = 2
    c.model.random.num_heads = 4
    c.model.random.num_kv_heads = 2
    c.model.random.head_dim = 8
    c.data.source = "arithmetic"
    c.data.instruction = "demo"
    c.data.arithmetic_max = 1  # answers 0..2: a random model is right now and then (mixed groups)
    c.data.max_prompt_tokens = 96
    c.reward.mode = "last_number"
    c.reward.num_workers = 0  # in-process verifier: no worker start-up in tests
    c.rollout.num_questions = 4
    c.rollout.group_size = 4
    c.rollout.max_new_tokens = 12
    c.rollout.temperature = 1.0
    c.mel.analysis_max_prompt_tokens = 1600  # characters: one token each
    c.mel.analysis_max_new_tokens = 16
    c.mel.replay_max_new_tokens = 8
    # a random model never writes the four sections: keep its analyses so that tests and smoke
    # runs still go through replay and the NLL term
    c.mel.filter_malformed = False
    c.optim.learning_rate = 1e-3
    c.mesh.fsdp = -1  # all devices (8 simulated CPU devices in tests)
    c.checkpoint.every_steps = 2
    c.logging.tensorboard = False
    c.logging.progress_bar = "off"
    c.export.at_end = True
    return c
