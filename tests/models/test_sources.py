"""Model sources a user types: a hub id (offline, from a pre-filled hub cache), gs://, errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

from meljax.models import (
    from_pretrained,
    load_tokenizer,
    resolve_model_path,
    save_pretrained,
    sources,
)
from meljax.models.tokenizer import make_tiny_tokenizer
from meljax.runtime import files
from tests.sampling.test_sampling import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny Hugging Face folder (weights, config, tokenizer) and its model."""
    folder = tmp_path_factory.mktemp("tiny_hf")
    model = tiny_model()
    save_pretrained(model, str(folder), tokenizer=make_tiny_tokenizer())
    (folder / "pytorch_model.bin").write_bytes(b"not needed")  # not a file meljax fetches
    return folder, model


def _hub_cache(root, folder, repo="acme/tiny-llama"):
    """The layout huggingface_hub writes: refs/main -> snapshots/<sha>/<files>."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / SHA
    snap.mkdir(parents=True)
    for name in os.listdir(folder):
        (snap / name).write_bytes((folder / name).read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(SHA)
    return root


def _same_weights(path, model):
    loaded = from_pretrained(path)
    np.testing.assert_array_equal(np.asarray(loaded.embed[...]), np.asarray(model.embed[...]))


def test_hub_id_loads_offline_from_the_hub_cache(model_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder, model = model_folder
    hub = _hub_cache(tmp_path / "hub", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for spec in ("acme/tiny-llama", "acme/tiny-llama@main", f"acme/tiny-llama@{SHA}"):
        path = resolve_model_path(spec)
        assert path == str(hub / "models--acme--tiny-llama" / "snapshots" / SHA), spec
        _same_weights(path, model)
        assert load_tokenizer(path).chat_template
    with pytest.raises(FileNotFoundError, match=r"hub id 'acme/missing' not found in the hub"):
        resolve_model_path("acme/missing")


def test_sample_command_takes_a_hub_id(model_folder, tmp_path):
    """As a user types it: ``meljax sample --model=org/name`` with HF_HUB_OFFLINE=1."""
    folder, _ = model_folder
    hub = _hub_cache(tmp_path / "hub", folder)
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    cmd = [sys.executable, "-m", "meljax", "sample", "--config.model.path=acme/tiny-llama"]
    cmd += ["--prompt=hi", "--config.rollout.max_new_tokens=3", "--config.rollout.temperature=0"]
    proc = subprocess.run(
        cmd,
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--- sample 0 (" in proc.stdout
    assert "PyTorch was not found" not in proc.stderr  # transformers' notice is silenced
    missing = subprocess.run(
        [sys.executable, "-m", "meljax", "sample", "--config.model.path=acme/nope", "--prompt=hi"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 2
    assert "hub id 'acme/nope' not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_gs_folder_is_copied_once_into_the_cache(model_folder, fake_gcs, tmp_path, monkeypatch):
    folder, model = model_folder
    monkeypatch.setenv("MELJAX_CACHE", str(tmp_path / "cache"))
    files.copy_tree(folder, "gs://bucket/models/tiny")
    path = resolve_model_path("gs://bucket/models/tiny")
    assert path == str(tmp_path / "cache" / "remote" / "gs" / "bucket" / "models" / "tiny")
    assert "pytorch_model.bin" not in os.listdir(path)
    _same_weights(path, model)
    assert load_tokenizer(path).chat_template
    fake_gcs.store.clear()  # a complete copy is reused without reading the bucket again
    assert resolve_model_path("gs://bucket/models/tiny") == path
    with pytest.raises(FileNotFoundError, match="remote folder not found: gs://bucket/other"):
        resolve_model_path("gs://bucket/other")


def test_unknown_source_names_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'no such thing' is not a local folder"):
        sources.resolve("no such thing")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        sources.resolve(str(tmp_path / "x.gguf"))
    with pytest.raises(FileNotFoundError, match="model folder not found: /nope/model"):
        sources.resolve("/nope/model")
    assert sources.resolve(str(tmp_path)) == str(tmp_path)
    assert not sources.is_hub_id(str(tmp_path)) and sources.is_hub_id("Qwen/Qwen3-8B@v1.0")


def test_generate_with_a_base_tokenizer_renders_raw(model_folder):
    from meljax.sampling import generate

    _, model = model_folder
    tok = make_tiny_tokenizer()
    tok.chat_template = None  # a base model's tokenizer
    out = generate(model, tok, ["the dog sat"], max_new_tokens=3, temperature=0.0)
    assert len(out) == 1 and len(out[0]) == 1
    with pytest.raises(ValueError, match="use chat=False"):
        generate(model, tok, ["the dog sat"], max_new_tokens=3, chat=True)
