"""meljax plan: every program of a run compiled for a target, measured, and judged."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meljax.plan import plan
from meljax.plan.architectures import BUILTIN, builtin_name, resolve_model_config
from meljax.plan.targets import tpu_topology_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny():
    from configs.tiny import get_config

    return get_config()


def _cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "meljax", "plan", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "name, topology, chips",
    [
        ("v5p-64", "v5p:2x4x4", 32),
        ("v5p-128", "v5p:4x4x4", 64),
        ("v6e-32", "v6e:4x8", 32),
        ("v6e-64", "v6e:8x8", 64),
        ("v5e-16", "v5e:4x4", 16),
        ("v5litepod-16", "v5e:4x4", 16),
        ("v4-8", "v4:2x2x1", 4),
        ("v5p:2x2x1", "v5p:2x2x1", 4),
    ],
)
def test_topology_names(name, topology, chips):
    gen, topo = tpu_topology_name(name)
    assert topo == topology
    assert math.prod(int(x) for x in topo.split(":")[1].split("x")) == chips


@pytest.mark.parametrize("bad", ["v5p-63", "v7x-8", "h100-8", "v6e-3"])
def test_unknown_topologies_are_refused(bad):
    with pytest.raises(ValueError, match="topology|slice"):
        tpu_topology_name(bad)


def test_builtin_architectures_have_the_published_sizes():
    """Parameter counts of the released checkpoints (model cards: 1.7B, 4.0B, 8.2B, 14.8B)."""
    cfg = _tiny()
    expected = {"qwen3-1.7b": 1.72e9, "qwen3-4b": 4.02e9, "qwen3-8b": 8.19e9, "qwen3-14b": 14.77e9}
    for name, params in expected.items():
        cfg.model.random_init, cfg.model.path = False, f"~/models/{name.upper()}-Base"
        model, source = resolve_model_config(cfg)
        assert builtin_name(cfg.model.path) == name and "built-in" in source
        assert model.num_params == pytest.approx(params, rel=0.01), name
    assert set(expected) <= set(BUILTIN)


def test_config_json_is_preferred(tmp_path):
    cfg = _tiny()
    hf = dict(BUILTIN["qwen3-4b"], num_hidden_layers=3)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg.model.random_init, cfg.model.path = False, str(tmp_path)
    model, source = resolve_model_config(cfg)
    assert model.num_layers == 3 and "config.json" in source
    cfg.model.path = str(tmp_path / "nothing-known")
    with pytest.raises(FileNotFoundError, match="--model_config"):
        resolve_model_config(cfg)


PARTS = ("prefill", "insert", "decode")


def test_plan_on_8_cpu_devices_measures_every_program():
    cfg = _tiny()
    report = plan(cfg, "cpu:8")
    names = [p.name for p in report.programs]
    passes = [f"{p}_{part}" for p in ("rollout", "analysis", "replay") for part in PARTS]
    assert names == ["rollout_weights", *passes, "update"]
    assert report.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    # FSDP: each device holds about an eighth of the weights (norms and indivisible dims are
    # replicated), and Adam's two moments twice that
    state = report.resident
    n_params = report.model["params"]
    assert 4 * n_params / 8 <= state["state.params"] < 4 * n_params / 2
    assert state["state.opt_state"] == pytest.approx(2 * state["state.params"], rel=0.05)
    for p in report.programs:
        assert p.status == "ok" and p.fits and 0 < p.total < p.capacity
        # the weights' layout change and the slot copy only move bytes
        moves_only = p.name == "rollout_weights" or p.name.endswith("_insert")
        assert (p.flops > 0 or moves_only) and p.hbm_bytes > 0
    update = report.programs[-1]
    # the update's arguments are the train state (params + moments) and the two batches
    assert update.arguments > state["state.params"] + state["state.opt_state"]
    assert update.resident == 0  # no reference model (kl_beta = 0): nothing else stays
    weights = report.programs[0]  # the decode copy of the weights, made from state.params
    assert weights.resident == state["state.opt_state"]  # the moments wait in memory
    assert weights.arguments >= state["state.params"]
    decode = report.programs[names.index("rollout_decode")]
    # the engine reads its own (replicated) copy: training weights and moments wait
    assert decode.resident == state["state.params"] + state["state.opt_state"]
    assert decode.arguments > 4 * n_params  # the replicated f32 weights (tiny: 1 device each)
    assert decode.dynamic_loops >= 1
    assert report.to_json()["fits"] is True


def test_kl_reference_adds_a_logprob_program_and_resident_weights():
    cfg = _tiny()
    cfg.algorithm.kl_beta = 0.05
    cfg.mel.enabled = False
    report = plan(cfg, "cpu:8", programs=["logprobs", "update"])
    assert [p.name for p in report.programs] == ["logprobs", "update"]
    assert report.resident["ref_params"] == report.resident["state.params"]
    assert report.programs[1].resident == report.resident["ref_params"]


def test_plan_cli_on_cpu_8_json():
    out = _cli("--config=configs/tiny.py", "--topology=cpu:8", "--json", "--programs=rollout")
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["fits"] and data["target"]["devices"] == 8
    # "rollout" selects the rollout's programs: weights, prefill, slot copy, decode segment
    names = [p["name"] for p in data["programs"]]
    assert names == ["rollout_weights"] + [f"rollout_{p}" for p in PARTS]
    assert all(p["fits"] and p["total"] > 0 for p in data["programs"])


def test_plan_cli_not_fitting_names_the_program_and_the_fix():
    out = _cli(
        "--config=configs/tiny.py", "--topology=cpu:8", "--programs=rollout", "--hbm_gib=0.000001"
    )
    assert out.returncode == 1
    assert "rollout_decode does not fit" in out.stderr and "rollout.max_new_tokens" in out.stderr


def test_plan_cli_bad_topology_is_a_clean_error():
    out = _cli("--config=configs/tiny.py", "--topology=v9z-8")
    assert out.returncode == 2
    assert "unknown topology" in out.stderr and "Traceback" not in out.stderr


tpu = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("libtpu"), reason="libtpu not installed"
)


@tpu
def test_plan_tiny_on_a_tpu_topology():
    cfg = _tiny()
    report = plan(cfg, "v5e:2x2", programs=["rollout", "update"])
    assert report.target.platform == "tpu" and len(report.target.devices) == 4
    for p in report.programs:
        assert p.fits and p.estimate_s > 0 and p.bound in ("compute", "HBM", "ICI")
        assert p.capacity == pytest.approx(15.75 * 2**30)


@tpu
def test_plan_reports_a_tpu_program_that_does_not_fit():
    """A 1.9B-parameter random model with replicated weights (mesh data=4): f32 weights plus
    Adam moments need about 22 GiB on each 15.75 GiB v5e chip."""
    cfg = _tiny()
    r = cfg.model.random
    r.hidden_size, r.intermediate_size, r.num_layers = 4096, 16384, 8
    r.num_heads, r.num_kv_heads, r.head_dim = 32, 8, 128
    cfg.mesh.data, cfg.mesh.fsdp = 4, 1
    report = plan(cfg, "v5e:2x2", programs=["rollout_weights", "rollout_decode"])
    weights, decode = report.programs
    assert weights.status == decode.status == "over" and not report.fits
    assert weights.resident == report.resident["state.opt_state"] > 14 * 2**30
    assert decode.total > decode.capacity and decode.headroom < 0
    messages = report.problems()
    assert messages[1].startswith("rollout_decode does not fit")
    assert "rollout.max_new_tokens" in messages[1]


def test_master_weights_stay_float32_with_bfloat16_storage():
    """model.param_dtype=bfloat16 stores weights in bf16, the trained copy and Adam's moments
    stay f32 unless optim.master_dtype asks for bf16."""
    from meljax.config.settings import settings
    from meljax.rl.optim import OptimizerConfig, make_optimizer
    from meljax.rl.state import init_train_state
    from meljax.trainer import setup

    cfg = _tiny()
    cfg.model.param_dtype = "bfloat16"
    s = settings(cfg)
    model, _ = setup.build_model_and_tokenizer(s.model, s.random, s.run.seed)
    from flax import nnx

    _, params = nnx.split(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("bfloat16")}
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=1e-3))
    for master, want in (("float32", np.float32), ("bfloat16", "bfloat16")):
        state = init_train_state(params, optimizer, None, master_dtype=master)
        floats = [
            x.dtype
            for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)
        ]
        assert floats and set(floats) == {np.dtype(want)}, master


def test_master_dtype_is_validated():
    from meljax.config.settings import validate

    cfg = _tiny()
    cfg.optim.master_dtype = "float16"
    with pytest.raises(ValueError, match="optim.master_dtype"):
        validate(cfg)


def test_prompt_limit_is_the_top_bucket():
    """A 6144-token analysis prompt limit pads prompts to 6144 slots, not to the 8192 bucket."""
    from meljax.models import ModelConfig, abstract_model
    from meljax.sampling import SamplingParams
    from tests.reference_sampler import Sampler

    graphdef, _ = abstract_model(ModelConfig())
    sampler = Sampler(graphdef, stop_token_ids=[1], pad_id=0, max_prompt_len=6144)
    sampling = SamplingParams(max_new_tokens=1024)
    assert sampler.shapes(256, 6144, sampling) == (256, 6144, 1024)
    assert sampler.shapes(256, 9000, sampling) == (256, 6144, 1024)  # cut to the limit
    assert sampler.shapes(256, 5000, sampling) == (256, 6144, 1024)
    assert sampler.shapes(256, 3000, sampling) == (256, 4096, 1024)


@tpu
def test_slot_copy_at_paper_scale_stays_per_device():
    """Qwen3-8B's first refill on v5p-64 (1,024 slot copies of 128 prompt caches of 1,024
    tokens into 1,024 slots x 5,120 cache slots): each chip copies its own prompts into its
    own 32 slots. A scatter into the row-sharded pool, the first implementation, replicated
    every update (167 GiB of temporaries per chip); a gather of prompt rows all-gathered
    every prompt's cache to every chip (19.3 GB here, 232 GB per MEL analysis refill)."""
    from configs.qwen3_paper import get_config

    report = plan(get_config("8b,mel"), "v5p-64", programs=["rollout_insert"])
    (insert,) = report.programs
    pool = insert.outputs  # the donated slot state, almost all of it the KV cache
    assert insert.fits and insert.aliased >= 0.99 * pool
    assert insert.temporaries < 0.1 * pool
    assert insert.collective_bytes == 0


@tpu
def test_rollout_with_a_tensor_parallel_training_mesh_on_v5p():
    """Training mesh fsdp=2 x tensor=2 on v5p-8 (4 chips): the topology-aware device order of
    that mesh differs from a data=4 mesh's, and the weights' re-layout program takes one and
    returns the other; jit refuses two device orders (14B on v5p-64 failed so), so the decode
    mesh reuses the training mesh's order."""
    from meljax.plan.targets import resolve_target
    from meljax.runtime import sharding as shd
    from meljax.sampling.weights import inference_mesh

    cfg = _tiny()
    cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2
    report = plan(cfg, "v5p-8", programs=["rollout"])
    assert [p.status for p in report.programs] == ["ok"] * 4
    cfg.rollout.tensor_parallel = 2
    report = plan(cfg, "v5p-8", programs=["rollout_weights", "rollout_decode"])
    assert all(p.fits for p in report.programs)

    devices = resolve_target("v5p-8").devices
    train = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=devices)
    for tensor in (1, 2, 4):
        decode = inference_mesh(train, tensor)
        assert list(decode.devices.flat) == list(train.devices.flat)
        assert dict(decode.shape) == {"data": 4 // tensor, "fsdp": 1, "tensor": tensor}


@tpu
def test_decode_segment_uses_the_cache_in_place(tmp_path):
    """A 2-layer Qwen3-8B decode segment on v5p-64 (1,024 slots x 5,120 cache slots, bf16: a
    1.25 GiB cache per chip). Written inside the decode loop, the cache was copied whole into
    and out of the TPU compiler's preferred layout around the loop and re-laid out per layer
    at every step: 1.4 GiB of temporaries. Read-only in the loop (new tokens in the segment
    buffer, merged once after it) and stored hd-minor, it is used in place."""
    from configs.qwen3_paper import get_config

    hf = dict(BUILTIN["qwen3-8b"], num_hidden_layers=2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    report = plan(
        get_config("8b,mel"), "v5p-64", programs=["rollout_decode"], model_config=str(path)
    )
    (decode,) = report.programs
    cache = 2 * 2 * (1024 // 32) * 8 * 5120 * 128 * 2  # k and v, 2 layers, one chip's rows
    assert decode.fits and decode.aliased >= cache
    assert decode.temporaries < 0.2 * cache


def test_replays_and_nll_rows_count_every_analysis_of_a_pair():
    """``mel.analyses_per_pair`` analyses per pair are each replayed and may each be kept."""
    cfg = _tiny()
    shapes = {}
    for per_pair in (1, 2):
        cfg.mel.analyses_per_pair = per_pair
        report = plan(cfg, "cpu:8", programs=["replay", "update"])
        shapes[per_pair] = {p.name: p.shapes for p in report.programs}
    analyses = cfg.mel.max_pairs_per_query * cfg.rollout.num_questions
    assert shapes[1]["replay_prefill"].startswith(f"{analyses} prompts")
    assert shapes[2]["replay_prefill"].startswith(f"{2 * analyses} prompts")
    nll_rows = [int(s["update"].split("NLL [")[1].split(",")[0]) for s in shapes.values()]
    assert nll_rows[0] >= analyses and nll_rows[1] >= 2 * analyses
