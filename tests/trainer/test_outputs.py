"""Every output of a run goes to its workdir, also when that is not a local folder (gs://).

``gs://`` paths go through etils.epath's fsspec backend; here the ``gcs`` protocol is an
in-memory filesystem (``fake_gcs`` in conftest.py), so nothing leaves the process. The checkpoints (orbax writes their
arrays with TensorStore's own GCS driver, which an fsspec fake cannot serve) go to a local
``checkpoint.directory``; everything else must land in the fake bucket and nowhere else.
"""

from __future__ import annotations

import json
import os

import pytest

from meljax.runtime import files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "eval")


def test_file_layer_appends_truncates_and_copies(fake_gcs, tmp_path):
    log = "gs://bucket/run/log.jsonl"
    files.append_jsonl(log, [{"step": 1}, {"step": 2}])
    files.append_jsonl(log, [{"step": 3}])
    assert files.read_jsonl(log) == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert files.truncate_jsonl(log, lambda r: r["step"] <= 2) == 1
    assert files.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f.bin").write_bytes(b"xyz")
    files.copy_tree(tmp_path / "d", "gs://bucket/run/out")
    assert files.path("gs://bucket/run/out/e/f.bin").read_bytes() == b"xyz"


@pytest.mark.slow
def test_run_with_a_gs_workdir_writes_everything_there_and_resumes(fake_gcs, tmp_path):
    import importlib.util

    from meljax.trainer.loop import train

    spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    cfg = tiny.get_config()
    cfg.total_steps = 2
    cfg.checkpoint.directory = str(tmp_path / "ckpt")
    cfg.logging.tensorboard = True
    cfg.eval.at_start = True
    cfg.eval.every_steps = 2
    cfg.eval.benchmarks = os.path.join(FIXTURES, "gsm8k", "test.jsonl")
    cfg.eval.limit = 2
    cfg.eval.num_samples = 2
    cfg.eval.max_new_tokens = 4
    workdir = "gs://bucket/runs/tiny"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a folder literally named "gs:" would show up here
    try:
        train(cfg, workdir)
        stored = set(fake_gcs.store)
        prefix = "gs://bucket/runs/tiny/"
        for name in (
            "metrics.jsonl",
            "config.json",
            "meta_experiences.jsonl",
            "eval/step_0.json",
            "eval/step_0.records.jsonl",
            "eval/step_2.json",
            "export/config.json",
            "export/model.safetensors",
        ):
            assert prefix + name in stored, (name, sorted(stored))
        assert any(k.startswith(prefix + "tensorboard/events.out") for k in stored)
        assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # nothing else was written locally
        records = files.read_jsonl(prefix + "metrics.jsonl")
        assert [r["step"] for r in records] == [0, 1, 2]
        assert "eval/gsm8k/pass@1_ci_low" in records[0]
        assert json.loads(files.path(prefix + "config.json").read_text())["total_steps"] == 2

        cfg.total_steps = 3  # resume from the bucket's run
        summary = train(cfg, workdir)
        assert summary.start_step == 2
        assert [r["step"] for r in files.read_jsonl(prefix + "metrics.jsonl")] == [0, 1, 2, 3]
        steps = [r["step"] for r in files.read_jsonl(prefix + "meta_experiences.jsonl")]
        assert steps == sorted(steps) and set(steps) <= {1, 2, 3}
    finally:
        os.chdir(cwd)
