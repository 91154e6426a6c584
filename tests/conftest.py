"""Test-wide set-up: 8 simulated CPU devices, set before JAX initialises."""

import os

# Backend optimisation level 0 roughly halves compile time on CPU (tests are compile-bound).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# commands started by tests compile afresh (no cache shared across tests or with the user)
os.environ.setdefault("MELJAX_COMPILE_CACHE", "off")


# -- shared fixtures

import subprocess  # noqa: E402
import sys  # noqa: E402

import fsspec  # noqa: E402
import pytest  # noqa: E402
from etils.epath import backend as epath_backend  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMS = os.path.join(REPO, "tests", "fixtures", "eval", "sums", "test.jsonl")


def _train_tiny(workdir, *flags) -> str:
    """Two tiny-config steps with a held-out evaluation on the sums fixture after each."""
    # one CPU device: the runs are compile-bound
    xla = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=xla)
    proc = subprocess.run(
        [sys.executable, "-m", "meljax", "train", "--config=configs/tiny.py",
         f"--workdir={workdir}", "--config.total_steps=2", "--config.eval.every_steps=1",
         f"--config.eval.benchmarks={SUMS}", "--config.eval.num_samples=4",
         "--config.eval.max_new_tokens=8", "--config.export.at_end=False", *flags],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    with open(f"{workdir}.stdout", "w") as f:  # next to the run folder, not in it
        f.write(proc.stdout)
    return str(workdir)


@pytest.fixture(scope="session")
def tiny_eval_runs(tmp_path_factory):
    """``(grpo, mel)`` run folders: the same seed and budget, MEL off / on; the MEL run also
    logs to W&B in offline mode when wandb is installed."""
    import importlib.util

    root = tmp_path_factory.mktemp("tiny_eval_runs")
    grpo = _train_tiny(root / "grpo", "--config.mel.enabled=False")
    wandb = []
    if importlib.util.find_spec("wandb") is not None:
        wandb = ["--config.logging.wandb=True", "--config.logging.wandb_mode=offline"]
    mel = _train_tiny(root / "mel", *wandb)
    return grpo, mel


class FakeGCS(MemoryFileSystem):
    """An in-memory ``gs://`` (paths are kept whole, so buckets stay apart)."""

    protocol = ("gs", "gcs")
    store: dict = {}  # noqa: RUF012 - one store per class, like MemoryFileSystem's
    pseudo_dirs = [""]  # noqa: RUF012

    def __init__(self, *args, finalize_on_close=None, **kw):
        super().__init__(*args, **kw)


@pytest.fixture
def fake_gcs():
    """``gs://`` served from memory through etils.epath's fsspec backend (no network)."""
    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    fsspec.register_implementation("gs", FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    yield FakeGCS
    FakeGCS.store.clear()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def scripted_result(rows: list[list[int]], max_new_tokens: int):
    """A ``SampleResult`` holding the given token rows (padded to ``max_new_tokens``; zero
    log-probs, nothing truncated): what a scripted sampler double returns."""
    import numpy as np

    from tests.reference_sampler import SampleResult

    tokens = np.zeros((len(rows), max_new_tokens), np.int32)
    mask = np.zeros((len(rows), max_new_tokens), bool)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, True
    return SampleResult(
        tokens,
        mask,
        np.zeros(tokens.shape, np.float32),
        mask.sum(1).astype(np.int32),
        np.zeros(len(rows), bool),
    )


def small_model_config(vocab_size: int, model_type: str = "llama"):
    """A random 2-layer decoder (hidden 32, 4 heads over 2 KV heads) of ``model_type`` with its
    family's switches (Qwen2: q/k/v bias and tied embeddings; Qwen3: q/k norm)."""
    from meljax.models import ModelConfig

    return ModelConfig(
        model_type=model_type,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=model_type == "qwen2",
    )


def small_llama_params(vocab_size: int, seed: int = 0):
    """``(graphdef, params)`` of a random :func:`small_model_config` llama over ``vocab_size``
    tokens: the model the MEL update tests train a lesson into."""
    from flax import nnx

    from meljax.models import Transformer

    model = Transformer(small_model_config(vocab_size), rngs=nnx.Rngs(seed))
    return nnx.split(model, nnx.Param)
