"""Qwen3-14B-Base, the GRPO baseline (MEL off), DAPO-Math-17k, 128 questions x G=8, lr 1e-6.

Set the model folder and data paths for your machine, e.g.
  meljax train --config=configs/qwen3_14b_grpo.py --workdir=gs://BUCKET/runs/qwen3-14b-grpo \
    --config.model.path=~/models/Qwen3-14B-Base
All fields and their meaning: meljax/config.py; the shared paper settings: meljax/paper.py.
"""

from meljax.paper import paper_config


def get_config():
    return paper_config("14b", mel=False)
