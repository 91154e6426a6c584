"""Several JAX processes (hosts) on this machine: a 2-process run equals a 1-process run.

Two `meljax train` processes with 2 CPU devices each form one 4-device mesh (gloo collectives,
coordinator on localhost), exactly as two TPU hosts would; the reference is one process with 4
devices. Every host computes the same global batch, the sampler all-gathers its rows, the
verifier splits each batch between hosts and all-gathers the verdicts, the update step takes
globally sharded inputs, and only process 0 writes metrics and meta-experiences.

Host 1's verifier is forced to time out on rows 1 and 3 of every batch
(``MELJAX_TEST_VERIFIER_HANG_ROWS``), as a loaded host would. Host 1 verifies rows 1::2, so the
one-process reference, given the same hook, times out on the same rows. Without shared verdicts
host 0 would score those rows itself and the hosts would disagree; every step's agreement check
(``meljax.runtime.multihost.check_agreement``) would then stop the run.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from meljax.config.settings import base_config, validate_distributed
from meljax.trainer.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.py")
EXACT = ("reward_mean", "accuracy", "completion_len_mean", "mixed_group_fraction")
EXACT += ("verifier_timeout_rate", "no_answer_rate")
EXACT += ("mel/generated", "mel/kept")
CLOSE = ("train/loss", "train/grad_norm", "train/entropy")  # reduction order differs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HANG = {"MELJAX_TEST_VERIFIER_HANG_ROWS": "1,3"}


def _train(workdir: str, devices: int, *extra: str, env_extra=None) -> subprocess.Popen:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        **(env_extra or {}),
    )
    cmd = [sys.executable, "-m", "meljax", "train", f"--config={TINY}", f"--workdir={workdir}"]
    # seed 3: the random tiny model gets some answers right, so groups are mixed and MEL writes
    # records to compare (with other seeds it may get none right in two steps)
    cmd += ["--config.total_steps=2", "--config.reward.timeout_s=2.0", "--config.seed=3", *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(proc: subprocess.Popen, what: str) -> None:
    try:
        # Only a deadlock needs the limit; a loaded machine (tests in parallel) is slow.
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out}\n{err[-4000:]}"


def test_two_processes_match_one_process(tmp_path):
    ref_dir, mp_dir = str(tmp_path / "ref"), str(tmp_path / "mp")
    _wait(_train(ref_dir, 4, env_extra=HANG), "1-process run")
    port = _free_port()
    procs = [
        _train(
            mp_dir,
            2,
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            env_extra=HANG if i == 1 else None,  # only host 1 is "loaded"
        )
        for i in range(2)
    ]
    for i, proc in enumerate(procs):
        _wait(proc, f"process {i} of 2")

    ref, mp = read_metrics(ref_dir), read_metrics(mp_dir)
    assert [r["step"] for r in mp] == [1, 2]  # one writer: no duplicated lines
    # Rows 1 and 3 of the 16 rollout answers timed out, in both runs alike.
    assert all(r["verifier_timeout_rate"] == 2 / 16 for r in ref + mp)
    for a, b in zip(ref, mp, strict=True):
        assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}
        np.testing.assert_allclose([b[k] for k in CLOSE], [a[k] for k in CLOSE], 1e-4, 1e-6)

    def texts(workdir):
        with open(os.path.join(workdir, "meta_experiences.jsonl")) as f:
            return [json.loads(line)["text"] for line in f]

    assert texts(mp_dir) == texts(ref_dir) and texts(ref_dir)
    assert os.listdir(os.path.join(mp_dir, "checkpoints")) == ["2"]
    assert os.path.exists(os.path.join(mp_dir, "export", "config.json"))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"coordinator_address": "h:1"}, "set all three or none"),
        ({"num_processes": 2, "process_id": 0}, "set all three or none"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "must be below"),
        ({"initialize": "sometimes"}, "is not one of"),
    ],
)
def test_distributed_config_errors(fields, message):
    dist = base_config().distributed
    for key, value in fields.items():
        dist[key] = value
    with pytest.raises(ValueError, match=message):
        validate_distributed(dist)


AGREEMENT = """
import sys
import jax
jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id={pid})
from meljax.runtime import multihost
assert multihost.allgather_objects({{"p": {pid}}}) == [{{"p": 0}}, {{"p": 1}}]
multihost.check_agreement("same", {{"x": [1, 2]}})
try:
    multihost.check_agreement("step 7", {{"x": [1, 2], "rewards": [{pid}]}})
except RuntimeError as e:
    print("RAISED", e)
"""


def test_agreement_check_names_what_hosts_disagree_on():
    port = _free_port()
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", AGREEMENT.format(port=port, pid=i)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert f"RAISED step 7: hosts disagree on rewards (process {i})" in out
