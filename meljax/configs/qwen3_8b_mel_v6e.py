"""Qwen3-8B-Base, MEL, for a v6e-64 slice (64 chips of 31.25 GiB): configs/qwen3_8b_mel.py with
the decode weights split 4-way and half the decode slots.

v6e chips have a third of v5p's memory. The update fits as it is (fsdp=64: 20.4 GiB per chip,
35% free); the rollout's decode segment does not with bf16 weights replicated on every chip
and 1,024 slots (40.9 GiB). Tensor-parallel decode weights (3.8 GiB per chip instead of 15.3)
and 512 slots (the 1,024 answers of a step decode in two waves) bring every sampling program
to 46% free or more (`meljax plan --config=configs/qwen3_8b_mel_v6e.py --topology=v6e-64`).
"""

from meljax.paper import paper_config


def get_config():
    c = paper_config("8b", mel=True)
    c.rollout.tensor_parallel = 4  # decode weights split over 4 chips, 16 replicas
    c.rollout.max_slots = 512  # KV cache of 512 slots x 5,120 tokens: 5.6 GiB per chip
    return c
