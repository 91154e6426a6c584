"""W&B logging in offline mode: the files a run writes hold its metrics, steps and config."""

from __future__ import annotations

import glob
import json
import os
import time

import pytest

from meljax.config.settings import base_config
from meljax.trainer.metrics import MetricsWriter, read_metrics
from meljax.trainer.wandb_log import RUN_ID_FILE, WandbLogger, build_loggers

pytest.importorskip("wandb")


def wandb_records(run_dir: str, timeout_s: float = 120.0) -> list:
    """The records of the run's ``.wandb`` file once W&B's writer process has written its
    ``exit`` record (``run.finish()`` can return before the file is complete)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _read_wandb_file(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_dir}: no exit record after {timeout_s} s")
        time.sleep(0.2)


def _read_wandb_file(run_dir: str) -> list:
    """The protobuf records of a ``.wandb`` file (LevelDB log format: 32 KiB blocks of
    7-byte-headed chunks; FULL=1, FIRST=2, MIDDLE=3, LAST=4) after its 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    out, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):
            break  # a record still being written
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(records) -> list[tuple[int, dict]]:
    return [
        (r.history.step.num, {item_key(i): json.loads(i.value_json) for i in r.history.item})
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def run_info(records):
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")


def offline_config(name=""):
    cfg = base_config()
    cfg.logging.wandb = True
    cfg.logging.wandb_mode = "offline"
    cfg.logging.wandb_project = "meljax-tests"
    cfg.logging.wandb_name = name
    cfg.rollout.group_size = 6
    return cfg


def test_offline_run_writes_metrics_and_config(tmp_path):
    workdir = str(tmp_path / "run-a")
    writer = MetricsWriter(workdir, tensorboard=False, loggers=build_loggers(
        offline_config(), workdir, is_chief=True))  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    writer.write(1, {"reward_mean": 0.25, "eval/sums/pass@1": 0.5, "time/step": float("nan")})
    writer.write(2, {"reward_mean": 0.75, "mel/kept": 3, "flag": True, "note": "text"})
    writer.close()
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]

    (run_dir,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
    records = wandb_records(run_dir)
    steps = history(records)
    assert [s for s, _ in steps] == [1, 2]
    first, second = steps[0][1], steps[1][1]
    assert first["reward_mean"] == 0.25 and first["eval/sums/pass@1"] == 0.5
    assert "time/step" not in first  # NaN is not logged
    assert second["reward_mean"] == 0.75 and second["mel/kept"] == 3.0
    assert "flag" not in second and "note" not in second
    run = run_info(records)
    assert run.project == "meljax-tests" and run.display_name == "run-a"
    config = {item_key(u): json.loads(u.value_json) for u in run.config.update}
    assert config["rollout"]["group_size"] == 6

    # a resumed run continues the same W&B run id
    with open(os.path.join(workdir, RUN_ID_FILE)) as f:
        run_id = f.read().strip()
    assert run.run_id == run_id
    again = WandbLogger(offline_config("renamed"), workdir)
    again.log(3, {"reward_mean": 1.0})
    again.close()
    runs = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
    assert len(runs) == 2
    assert {run_info(wandb_records(d)).run_id for d in runs} == {run_id}


def test_only_process_zero_logs(tmp_path):
    cfg = offline_config()
    assert build_loggers(cfg, str(tmp_path), is_chief=False) == []
    cfg.logging.wandb = False
    assert build_loggers(cfg, str(tmp_path), is_chief=True) == []
    writer = MetricsWriter(str(tmp_path), is_chief=False, loggers=[object()])
    assert writer.loggers == []
    assert not os.listdir(tmp_path)


def test_training_run_logs_every_step_to_wandb(tiny_eval_runs):
    workdir = tiny_eval_runs[1]  # trained with logging.wandb=True, wandb_mode=offline
    (run_dir,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
    steps = history(wandb_records(run_dir))
    metrics = read_metrics(workdir)
    assert [s for s, _ in steps] == [r["step"] for r in metrics] == [1, 2]
    for (_, logged), record in zip(steps, metrics, strict=True):
        assert logged["reward_mean"] == record["reward_mean"]
        assert logged["eval/sums/pass@1"] == record["eval/sums/pass@1"]
        assert logged["train/loss"] == pytest.approx(record["train/loss"])
    assert not glob.glob(os.path.join(tiny_eval_runs[0], "wandb"))  # the GRPO run did not log
