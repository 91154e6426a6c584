"""A workdir keeps what a user has (issue 28): logs with a bad line, one run at a time, the
run's config, and checkpoints that fall back. Fast unit tests; the end-to-end cases (the
``meljax train`` command on the tiny config) are in test_trainer.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from meljax.runtime import files
from meljax.trainer import workdir as run_folder
from meljax.trainer.workdir import LOCK_FILE, WorkdirBusy, WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _lines(*records) -> bytes:
    return b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records
    )


# -- logs that survive a bad line


def test_a_bad_middle_line_hides_and_drops_nothing(tmp_path, caplog):
    log = tmp_path / "metrics.jsonl"
    data = _lines({"step": 1}, b"{not json", {"step": 2}, b"\xff\xfe", {"step": 3})
    log.write_bytes(data)
    assert [r["step"] for r in files.read_jsonl(log)] == [1, 2, 3]
    with caplog.at_level(logging.WARNING):
        # a finished run's restart: nothing after its checkpoint, so nothing changes
        assert files.truncate_jsonl(log, lambda r: r["step"] <= 3) == 0
    assert log.read_bytes() == data
    assert "2 unreadable lines (lines 2, 4)" in caplog.text


def test_truncation_cuts_by_step_and_moves_unreadable_lines_aside(tmp_path, caplog):
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(_lines({"step": 1}, b"garbage", {"step": 2}, {"step": 3}, {"step": 4}))
    with caplog.at_level(logging.WARNING):
        assert files.truncate_jsonl(log, lambda r: r["step"] <= 2) == 2
    assert log.read_bytes() == _lines({"step": 1}, {"step": 2})
    side = files.unreadable_path(log)
    assert side.read_bytes() == b"garbage\n"
    assert "1 unreadable line (line 2) moved to" in caplog.text and str(side) in caplog.text


def test_a_last_line_cut_short_is_moved_aside_before_the_next_append(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(_lines({"step": 1}) + b'{"step": 2, "rew')
    assert files.truncate_jsonl(log, lambda r: r["step"] <= 1) == 0
    files.append_jsonl(log, [{"step": 2}])
    assert files.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    assert files.unreadable_path(log).read_bytes() == b'{"step": 2, "rew\n'


# -- one run per workdir

_HOLD = (
    "import sys, time\n"
    "from meljax.trainer.workdir import WorkdirLock\n"
    "WorkdirLock.acquire(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def hold_lock(workdir) -> subprocess.Popen:
    """Another process holding ``workdir``'s lock (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_naming_the_first_and_a_dead_one_s_lock_is_taken_over(
    tmp_path, caplog
):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(WorkdirBusy) as e:
            WorkdirLock.acquire(str(tmp_path))
        message = str(e.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert "since" in message and str(tmp_path / LOCK_FILE) in message
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the file stays behind
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING):
        lock = WorkdirLock.acquire(str(tmp_path))
    assert f"pid {holder.pid}" in caplog.text and "taking it over" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    with run_folder.hold(str(tmp_path)):  # released, also when the block raises
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


def test_without_flock_the_pid_in_the_lock_file_decides(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock_file = tmp_path / LOCK_FILE
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    for info, busy in [
        ({"host": socket.gethostname(), "pid": os.getppid()}, True),  # alive here
        ({"host": "elsewhere", "pid": 12345}, True),  # cannot tell: assume alive
        ({"host": socket.gethostname(), "pid": int(dead.stdout)}, False),  # stale
    ]:
        lock_file.write_text(json.dumps(info))
        if busy:
            with pytest.raises(WorkdirBusy, match=f"pid {info['pid']}"):
                WorkdirLock.acquire(str(tmp_path))
        else:
            WorkdirLock.acquire(str(tmp_path)).release()


def test_a_remote_workdir_takes_no_lock_and_says_so(caplog):
    with caplog.at_level(logging.WARNING), run_folder.hold("gs://bucket/run"):
        pass
    assert "no workdir lock" in caplog.text


# -- a workdir remembers its run


def _tiny():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_a_resume_with_a_config_that_shapes_the_run_differently_is_refused(tmp_path):
    workdir = str(tmp_path)
    cfg = _tiny()
    run_folder.record_config(workdir, cfg, {}, 0)
    saved = (tmp_path / "config.json").read_text()
    cfg.rollout.group_size = 8
    cfg.model.random.hidden_size = 64
    cfg.total_steps = 10  # harmless: not listed
    cfg.eval.every_steps = 5
    with pytest.raises(ValueError) as e:
        run_folder.check_config_changes(workdir, cfg, step=3)
    message = str(e.value)
    assert "model.random.hidden_size: 32 -> 64, rollout.group_size: 4 -> 8;" in message
    assert "total_steps" not in message and "--allow_config_change" in message
    assert "\n" not in message
    assert (tmp_path / "config.json").read_text() == saved
    assert run_folder.check_config_changes(workdir, cfg, step=None) == {}  # a fresh start

    changes = run_folder.check_config_changes(workdir, cfg, step=3, allow=True)
    assert set(changes) == {
        "rollout.group_size",
        "model.random.hidden_size",
        "total_steps",
        "eval.every_steps",
    }
    run_folder.record_config(workdir, cfg, changes, 3)
    (record,) = files.read_jsonl(tmp_path / run_folder.CONFIG_HISTORY_FILE)
    assert record["step"] == 3 and record["changes"]["rollout.group_size"] == [4, 8]
    assert record["allowed_by_flag"] == ["model.random.hidden_size", "rollout.group_size"]
    assert json.loads((tmp_path / "config.json").read_text())["rollout"]["group_size"] == 8


def test_harmless_changes_are_allowed_and_recorded(tmp_path):
    workdir = str(tmp_path)
    cfg = _tiny()
    run_folder.record_config(workdir, cfg, {}, 0)
    cfg.total_steps = 10
    cfg.logging.log_every = 5
    cfg.checkpoint.every_steps = 1
    changes = run_folder.check_config_changes(workdir, cfg, step=3)
    assert changes == {
        "checkpoint.every_steps": (2, 1),
        "logging.log_every": (1, 5),
        "total_steps": (3, 10),
    }
    run_folder.record_config(workdir, cfg, changes, 3)
    (record,) = files.read_jsonl(tmp_path / run_folder.CONFIG_HISTORY_FILE)
    assert record["allowed_by_flag"] == [] and record["changes"]["total_steps"] == [3, 10]


# -- checkpoints that fall back


@pytest.fixture
def two_checkpoints(tmp_path):
    import jax.numpy as jnp

    from meljax.trainer.checkpointing import Checkpointer

    directory = str(tmp_path / "checkpoints")
    state = {"w": jnp.arange(4096.0) * 1.5, "b": jnp.ones(3)}
    ckpt = Checkpointer(directory)
    for step in (1, 2):
        ckpt.save(step, jax_tree_scale(state, step), {"step": step})
    ckpt.close()
    return directory, state


def jax_tree_scale(state, factor):
    import jax

    return jax.tree.map(lambda x: x * factor, state)


def _truncate_largest_data_file(step_dir: str) -> None:
    found = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if os.path.basename(root) == "d"
    ]
    largest = max(found, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


# orbax leaves the failed restore's other array reads un-awaited: harmless, but reported
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["extra/metadata deleted", "data file truncated"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(
    two_checkpoints, damage, caplog
):
    import numpy as np

    from meljax.trainer.checkpointing import Checkpointer

    directory, state = two_checkpoints
    if damage == "extra/metadata deleted":
        os.remove(os.path.join(directory, "2", "extra", "metadata"))
        culprit = os.path.join(directory, "2", "extra", "metadata")
    else:
        _truncate_largest_data_file(os.path.join(directory, "2"))
        culprit = os.path.join(directory, "2", "state")
    ckpt = Checkpointer(directory)
    with caplog.at_level(logging.WARNING):
        step, restored, extra = ckpt.restore_latest(state)
    assert step == 1 and extra == {"step": 1}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    (line,) = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert line.startswith("checkpoint step 2 does not restore (") and "\n" not in line
    assert culprit in line  # the file (or the OCDBT folder and array) that failed
    assert "resuming from step 1" in line
    assert sorted(os.listdir(directory)) == ["1", "2.unrestorable"]  # kept, not deleted
    ckpt.save(2, state, {"step": 2})  # the resumed run saves step 2 again
    ckpt.close()


def test_no_checkpoint_that_restores_is_one_clear_error(two_checkpoints):
    from meljax.trainer.checkpointing import Checkpointer

    directory, state = two_checkpoints
    for step in ("1", "2"):
        os.remove(os.path.join(directory, step, "extra", "metadata"))
    ckpt = Checkpointer(directory)
    with pytest.raises(ValueError, match=r"no checkpoint in .* restores \(step 2: .*step 1: "):
        ckpt.restore_latest(state)
    assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing moved when nothing restores
    ckpt.close()


def test_a_reader_of_a_run_skips_a_corrupt_latest_checkpoint_and_renames_nothing(
    two_checkpoints, caplog
):
    """``meljax eval --workdir`` / ``convert --source=WORKDIR`` read the newest checkpoint
    that restores; a reader leaves the folder as it found it."""
    import numpy as np

    from meljax.trainer.checkpointing import Checkpointer, _restore_readonly

    directory, state = two_checkpoints
    _truncate_largest_data_file(os.path.join(directory, "2"))
    ckpt = Checkpointer(directory, create=False)
    with caplog.at_level(logging.WARNING):
        flat = _restore_readonly(ckpt, None)
    np.testing.assert_array_equal(np.asarray(flat["w"]), np.asarray(state["w"]))  # step 1
    assert any("step 2 does not restore" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"restores \(step 2: "):
        _restore_readonly(ckpt, 2)  # the step asked for, named
    assert sorted(os.listdir(directory)) == ["1", "2"]
    ckpt.close()
