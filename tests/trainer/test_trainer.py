"""End to end: the tiny config trains, checkpoints, resumes exactly, and fails clearly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from meljax.trainer.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.py")
# Metrics that must match bit for bit after a resume (timings and throughputs cannot).
DETERMINISTIC = (
    "reward_mean",
    "accuracy",
    "completion_len_mean",
    "mixed_group_fraction",
    "train/loss",
    "train/grad_norm",
    "train/entropy",
    "mel/generated",
    "mel/kept",
)


def meljax(*args, timeout=600, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "meljax", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"meljax {args} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def strip(records):
    return [{k: r.get(k) for k in ("step",) + DETERMINISTIC} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    meljax("train", f"--config={TINY}", f"--workdir={workdir}", "--config.total_steps=4")
    return workdir


def test_run_writes_metrics_checkpoints_meta_log_and_export(full_run):
    records = read_metrics(full_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in (
        "reward_mean",
        "accuracy",
        "truncation_rate",
        "mixed_group_fraction",
        "retention_ratio",
        "train/loss",
        "train/grad_norm",
        "train/lr",
        "time/rollout",
        "time/update",
        "mel/generated",
        "mel/kept",
    ):
        assert key in records[-1], key
    # the rollout engine's useful tokens / slot-steps (a step may run finished slots)
    assert all(0 < r["slot_utilisation"] <= 1 for r in records)
    tokens = records[-1]["rollout_tokens"]
    assert records[-1]["slot_utilisation"] <= tokens / records[-1]["completion_len_max"] / 16 + 1e-9
    assert sorted(os.listdir(os.path.join(full_run, "checkpoints")))[-1] == "4"
    assert os.path.exists(os.path.join(full_run, "export", "config.json"))
    with open(os.path.join(full_run, "config.json")) as f:
        assert json.load(f)["total_steps"] == 4


def test_resume_reproduces_uninterrupted_run(full_run, tmp_path):
    workdir = str(tmp_path)
    meljax("train", f"--config={TINY}", f"--workdir={workdir}", "--config.total_steps=2")
    meljax("train", f"--config={TINY}", f"--workdir={workdir}", "--config.total_steps=4")
    assert strip(read_metrics(workdir)) == strip(read_metrics(full_run))


def meta_keys(workdir):
    with open(os.path.join(workdir, "meta_experiences.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["question_id"], r["pair"]["incorrect"], r["text"]) for r in records]


def test_sigterm_saves_a_checkpoint_and_resume_equals_the_uninterrupted_run(full_run, tmp_path):
    workdir = str(tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "meljax", "train", f"--config={TINY}", f"--workdir={workdir}"]
    # No periodic checkpoint before the end: all that survives is what SIGTERM saves.
    proc = subprocess.Popen(
        [*cmd, "--config.total_steps=4", "--config.checkpoint.every_steps=100"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not read_metrics(workdir):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # during step 2 (or, at the latest, right after it)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "rerun the same command to resume" in err
    saved = [int(x) for x in os.listdir(os.path.join(workdir, "checkpoints"))]
    assert len(saved) == 1 and 1 <= saved[0] < 4
    meljax("train", f"--config={TINY}", f"--workdir={workdir}", "--config.total_steps=4")
    assert strip(read_metrics(workdir)) == strip(read_metrics(full_run))
    assert meta_keys(workdir) == meta_keys(full_run)  # no duplicated meta-experience records


def test_resume_drops_meta_log_records_of_unsaved_steps(full_run, tmp_path):
    # A run killed after writing step 4's records but before its checkpoint: the copied run
    # resumes from step 2 and must not keep (or duplicate) the records of steps 3 and 4.
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(full_run, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    meljax("train", f"--config={TINY}", f"--workdir={workdir}", "--config.total_steps=4")
    assert meta_keys(workdir) == meta_keys(full_run)
    assert strip(read_metrics(workdir)) == strip(read_metrics(full_run))


def test_killed_run_resumes_from_last_complete_checkpoint(full_run, tmp_path):
    workdir = str(tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meljax",
            "train",
            f"--config={TINY}",
            f"--workdir={workdir}",
            "--config.total_steps=4",
            "--config.checkpoint.every_steps=1",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 300
    # Kill as soon as anything appears in the checkpoint folder: mid-save or just after.
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and os.listdir(ckpts):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meljax("train", f"--config={TINY}", f"--workdir={workdir}", "--config.total_steps=4")
    assert strip(read_metrics(workdir)) == strip(read_metrics(full_run))


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.rollout.group_sise=4", "group_sise"),
        ("--config.rollout.group_size=1", "group_size=1"),
        ("--config.data.source=file", "data.path"),
        ("--config.mesh.data=3", "does not divide"),
    ],
)
def test_config_errors_are_clear(tmp_path, flag, message):
    proc = meljax(
        "train", f"--config={TINY}", f"--workdir={tmp_path}", flag, check=False, timeout=120
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr or "group_sise" in flag


def test_missing_model_path_is_one_clear_error(tmp_path):
    proc = meljax(
        "train",
        f"--config={TINY}",
        f"--workdir={tmp_path}",
        "--config.model.random_init=False",
        "--config.model.path=/nope/model",
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "model folder not found: /nope/model" in proc.stderr


def test_internal_errors_keep_their_traceback():
    from meljax.commands.common import is_user_error

    def raise_in_meljax():
        from meljax.config.settings import validate

        cfg = __import__("meljax.config.settings", fromlist=["base_config"]).base_config()
        cfg.rollout.group_size = 1
        validate(cfg)

    try:
        raise_in_meljax()
    except ValueError as e:
        assert is_user_error(e)  # a bad config: one line, exit code 2
    try:
        None.nope  # noqa: B018 - an internal bug
    except AttributeError as e:
        assert not is_user_error(e)
    try:
        import numpy as np

        np.zeros(3).reshape(2)  # a ValueError from inside a library: a bug, not the user's
    except ValueError as e:
        assert not is_user_error(e)


def test_eval_of_a_run_uses_the_run_s_prompts_stops_and_verifier(full_run, tmp_path):
    """`meljax eval --workdir` builds the run's Policy: same prompt ids and stops as training."""
    from flax import nnx

    from meljax.config.settings import settings
    from meljax.trainer import setup
    from meljax.trainer.loop import load_config_from_workdir

    gsm8k = os.path.join(REPO, "tests", "fixtures", "eval", "gsm8k", "test.jsonl")
    out = str(tmp_path / "report.json")
    meljax(
        "eval",
        f"--workdir={full_run}",
        f"--config.eval.benchmarks={gsm8k}",
        "--config.eval.limit=2",
        "--config.eval.num_samples=2",
        "--config.eval.max_new_tokens=4",
        "--config.reward.num_workers=0",
        f"--output={out}",
    )
    with open(out) as f:
        report = json.load(f)
    cfg = load_config_from_workdir(full_run)
    s = settings(cfg)
    model, tok = setup.build_model_and_tokenizer(s.model, s.random, s.run.seed)
    policy = setup.build_policy(s, nnx.split(model)[0], tok)
    meta = report["meta"]
    assert meta["answer_mode"] == s.reward.mode == "last_number"
    assert meta["instruction"] == policy.instruction and meta["stop_token_ids"] == list(
        policy.stop_ids
    )
    with open(str(tmp_path / "report.records.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["prompt_tokens"] for r in records] == [
        len(policy.encode(r["question"])) for r in records
    ]


def _copy_run(full_run, tmp_path) -> str:
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(full_run, workdir)
    return workdir


def test_restarting_a_finished_run_keeps_its_logs_and_refuses_another_config(full_run, tmp_path):
    """Issue 28, items 2 and 5: a bad line in metrics.jsonl erased every later record at the
    next start; a resume with another group size went on silently and rewrote config.json."""
    workdir = _copy_run(full_run, tmp_path)
    metrics = os.path.join(workdir, "metrics.jsonl")
    with open(metrics, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    damaged = b"".join(lines[:2] + [b"{half a line\n"] + lines[2:])
    with open(metrics, "wb") as f:
        f.write(damaged)
    run = ("train", f"--config={TINY}", f"--workdir={workdir}", "--config.total_steps=4")
    proc = meljax(*run)
    assert "nothing to do: already at step 4" in proc.stdout
    assert "1 unreadable line (line 3)" in proc.stderr
    with open(metrics, "rb") as f:
        assert f.read() == damaged  # nothing erased, nothing rewritten
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]

    with open(os.path.join(workdir, "config.json")) as f:
        saved = f.read()
    proc = meljax(*run, "--config.rollout.group_size=8", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "rollout.group_size: 4 -> 8" in errors[0], proc.stderr[-3000:]
    assert "--allow_config_change" in errors[0] and "Traceback" not in proc.stderr
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == saved


def test_a_corrupt_latest_checkpoint_is_reported_and_the_one_before_resumes(full_run, tmp_path):
    """Issue 28, item 7: checkpoint 4 without extra/metadata stopped with an orbax traceback."""
    workdir = _copy_run(full_run, tmp_path)
    os.remove(os.path.join(workdir, "checkpoints", "4", "extra", "metadata"))
    proc = meljax("train", f"--config={TINY}", f"--workdir={workdir}", "--config.total_steps=4")
    assert "checkpoint step 4 does not restore (FileNotFoundError: " in proc.stderr
    assert "resuming from step 2" in proc.stderr
    assert strip(read_metrics(workdir)) == strip(read_metrics(full_run))
    assert meta_keys(workdir) == meta_keys(full_run)
    assert {"4", "4.unrestorable"} <= set(os.listdir(os.path.join(workdir, "checkpoints")))


def test_a_second_run_on_a_workdir_in_use_stops_naming_the_first(tmp_path):
    """Issue 28, item 4: two `meljax train` on one workdir both ran and wrote every record
    twice."""
    from tests.trainer.test_workdir import hold_lock

    holder = hold_lock(tmp_path)
    try:
        proc = meljax(
            "train", f"--config={TINY}", f"--workdir={tmp_path}", check=False, timeout=300
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"is in use by another meljax train (host {socket.gethostname()}, pid {holder.pid}" in (
        proc.stderr
    )
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))
