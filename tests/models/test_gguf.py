"""The embedded SmolLM2-135M-Instruct GGUF: our import vs transformers' own GGUF loader."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from meljax.models import demo_gguf_path, demo_model_dir, from_pretrained, load_tokenizer
from meljax.models.gguf_import import _unpermute

pytestmark = pytest.mark.slow


def test_unpermute_inverts_llama_cpp_permute():
    heads, hd, d = 3, 8, 5
    w = np.arange(heads * hd * d, dtype=np.float32).reshape(heads * hd, d)
    # llama.cpp's convert script: reshape(heads, 2, hd/2, d).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, hd // 2, d).swapaxes(1, 2).reshape(heads * hd, d)
    np.testing.assert_array_equal(_unpermute(permuted, heads), w)


@pytest.fixture(scope="module")
def demo_dir():
    return demo_model_dir()


def test_greedy_next_tokens_match_transformers_gguf_loader(demo_dir):
    gguf = demo_gguf_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()
    model = from_pretrained(demo_dir)
    tok = load_tokenizer(demo_dir)
    prompts = ["What is 3 plus 5?", "Name the capital of France.", "Write a haiku about rain."]
    for p in prompts:
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].numpy()
        ours = np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]
        np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
        assert np.abs(ours - theirs).max() < 1e-2
