"""Tests for the tpu/*.sh gcloud wrappers.

The scripts only ever run with DRY_RUN=1: they print '+ gcloud ...' lines, which are parsed
with shlex and checked. A fake `gcloud` first on PATH fails the test if any call escapes the
dry run. The remote shell commands that run.sh / stop.sh / logs.sh / setup.sh hand to
`gcloud ... ssh --command=...` are also executed locally, inside a throw-away HOME with fake
`curl`/`tmux`/`meljax` programs, to prove that quoting survives the trip to a worker.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU = REPO / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "status.sh", "stop.sh", "delete.sh"]
SLICE = {
    "TPU_NAME": "meljax-v5p",
    "ZONE": "us-east5-a",
    "PROJECT": "my-proj",
    "ACCELERATOR": "v5p-32",
}
LOC = ["--zone=us-east5-a", "--project=my-proj"]


@dataclass
class Result:
    rc: int
    out: str
    err: str
    cmds: list[list[str]]  # one argv per '+ ' line of stdout


@pytest.fixture
def sh(tmp_path: Path):
    """Returns run(script, *args, env=, unset=, stdin=, strict=) -> Result, always dry-run."""
    guard = tmp_path / "guard"
    guard.mkdir()
    marker = tmp_path / "real-gcloud-called"
    fake = guard / "gcloud"
    fake.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 97\n")
    fake.chmod(0o755)
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    home = tmp_path / "home"
    home.mkdir()

    def run(
        script: str,
        *args: str,
        env: dict[str, str] | None = None,
        unset: tuple[str, ...] = (),
        stdin: str | None = None,
        strict: bool = True,
    ) -> Result:
        full = {
            "PATH": f"{guard}:{os.environ['PATH']}",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "DRY_RUN": "1",
            "TPU_ENV_FILE": str(empty_env_file),
            **SLICE,
            **(env or {}),
        }
        for key in unset:
            full.pop(key, None)
        proc = subprocess.run(
            ["bash", str(TPU / script), *args],
            env=full,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert not marker.exists(), f"{script} ran gcloud for real under DRY_RUN=1"
        cmds = []
        for line in proc.stdout.splitlines():
            # Dry-run stdout carries only the printed commands, one per line (--help aside).
            assert line.startswith("+ ") or not strict, f"{script}: stray stdout line {line!r}"
            if line.startswith("+ "):
                cmds.append(shlex.split(line[2:]))
        return Result(proc.returncode, proc.stdout, proc.stderr, cmds)

    return run


def flag_value(argv: list[str], flag: str) -> str:
    """Value of --flag=VALUE in argv (exactly one occurrence)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
    assert len(values) == 1, f"{flag} appears {len(values)} times in {argv}"
    return values[0]


def ssh_cmds(res: Result) -> list[list[str]]:
    return [c for c in res.cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]


# --------------------------------------------------------------------------- help / errors


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_usage_and_exits_zero_without_settings(sh, script, flag):
    res = sh(script, flag, unset=tuple(SLICE), strict=False)
    assert res.rc == 0, res.err
    assert res.out.startswith(f"Usage: tpu/{script}")
    assert "DRY_RUN" in res.out  # the shared settings block is there too
    assert res.cmds == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_tpu_name_is_a_clear_error(sh, script):
    args = ["--", "meljax", "train"] if script == "run.sh" else []
    res = sh(script, *args, env={"YES": "1"}, unset=("TPU_NAME",))
    assert res.rc != 0
    assert "missing required setting(s): TPU_NAME" in res.err
    assert res.cmds == []


def test_missing_several_settings_are_all_named(sh):
    res = sh("create.sh", unset=("ZONE", "ACCELERATOR"))
    assert res.rc != 0
    assert "missing required setting(s): ZONE, ACCELERATOR." in res.err
    res = sh("create.sh", unset=("ACCELERATOR",))
    assert res.rc != 0 and "ACCELERATOR" in res.err and res.cmds == []


def test_unknown_option_is_a_usage_error(sh):
    res = sh("create.sh", "--spotty")
    assert res.rc == 2 and "--spotty" in res.err and res.cmds == []


def test_invalid_tpu_name_is_rejected(sh):
    res = sh("create.sh", env={"TPU_NAME": "My TPU"})
    assert res.rc != 0 and "TPU_NAME" in res.err and res.cmds == []


# --------------------------------------------------------------------------- create


def test_create_multihost_v5p_queued_resource(sh):
    res = sh("create.sh")
    assert res.rc == 0, res.err
    create, describe = res.cmds  # the dry run shows the poll command once
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "meljax-v5p"]
    assert flag_value(create, "--node-id") == "meljax-v5p"
    assert flag_value(create, "--accelerator-type") == "v5p-32"
    assert flag_value(create, "--runtime-version") == "v2-alpha-tpuv5"
    assert flag_value(create, "--zone") == "us-east5-a"
    assert flag_value(create, "--project") == "my-proj"
    assert not {"--spot", "--reserved", "--best-effort"} & set(create)
    assert describe[:6] == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        "meljax-v5p",
    ]
    assert flag_value(describe, "--format") == "value(state.state)"


@pytest.mark.parametrize(
    ("accelerator", "runtime"),
    [
        ("v5p-32", "v2-alpha-tpuv5"),
        ("v6e-64", "v2-alpha-tpuv6e"),
        ("v6e-16", "v2-alpha-tpuv6e"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v4-32", "tpu-ubuntu2204-base"),
    ],
)
def test_runtime_version_follows_accelerator_family(sh, accelerator, runtime):
    res = sh("create.sh", "--no-wait", env={"ACCELERATOR": accelerator})
    assert res.rc == 0, res.err
    (create,) = res.cmds
    assert flag_value(create, "--accelerator-type") == accelerator
    assert flag_value(create, "--runtime-version") == runtime


def test_explicit_runtime_version_wins(sh):
    res = sh("create.sh", "--no-wait", env={"RUNTIME_VERSION": "v2-alpha-tpuv6e-custom"})
    assert flag_value(res.cmds[0], "--runtime-version") == "v2-alpha-tpuv6e-custom"


def test_unknown_accelerator_family_needs_runtime_version(sh):
    res = sh("create.sh", env={"ACCELERATOR": "v9x-8"})
    assert res.rc != 0 and "RUNTIME_VERSION" in res.err and res.cmds == []
    res = sh("create.sh", "--no-wait", env={"ACCELERATOR": "v9x-8", "RUNTIME_VERSION": "rt"})
    assert res.rc == 0 and flag_value(res.cmds[0], "--runtime-version") == "rt"


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({"SPOT": "1"}, [], "--spot"),
        ({"SPOT": "0"}, [], None),
        ({}, ["--spot"], "--spot"),
        ({"RESERVED": "1"}, [], "--reserved"),
        ({}, ["--reserved"], "--reserved"),
    ],
)
def test_spot_flag_only_when_requested(sh, env, args, expected):
    res = sh("create.sh", "--no-wait", *args, env=env)
    assert res.rc == 0, res.err
    (create,) = res.cmds
    tiers = [a for a in create if a in ("--spot", "--reserved", "--best-effort")]
    assert tiers == ([expected] if expected else [])


def test_best_effort_uses_alpha_command_group(sh):
    res = sh("create.sh", "--no-wait", env={"BEST_EFFORT": "1"})
    (create,) = res.cmds
    assert create[:6] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"]
    assert "--best-effort" in create and "--spot" not in create


def test_conflicting_tiers_and_bad_booleans_are_rejected(sh):
    res = sh("create.sh", env={"SPOT": "1", "RESERVED": "1"})
    assert res.rc != 0 and "SPOT" in res.err and "RESERVED" in res.err and res.cmds == []
    res = sh("create.sh", env={"SPOT": "maybe"})
    assert res.rc != 0 and "SPOT must be 0 or 1" in res.err and res.cmds == []


def test_extra_gcloud_flags_after_double_dash(sh):
    res = sh("create.sh", "--no-wait", "--", "--valid-until-duration=6h", "--description=a b")
    (create,) = res.cmds
    assert create[-2:] == ["--valid-until-duration=6h", "--description=a b"]


def test_dry_run_without_project_uses_placeholder_not_gcloud(sh):
    res = sh("create.sh", "--no-wait", unset=("PROJECT",))
    assert res.rc == 0, res.err
    assert flag_value(res.cmds[0], "--project") == "PROJECT_ID"
    assert "placeholder" in res.err


# --------------------------------------------------------------------------- settings file


def test_env_file_fills_settings_and_environment_wins(sh, tmp_path):
    env_file = tmp_path / "tpu.env"
    env_file.write_text(
        "# comment\n\nTPU_NAME=from-file\nexport ZONE='europe-west4-a'  # quoted, then a comment\n"
        'ACCELERATOR="v6e-16"\n  SPOT=1    # inline comment\nGIT_REF=abc#keep\n'
    )
    res = sh(
        "create.sh",
        "--no-wait",
        env={"TPU_ENV_FILE": str(env_file), "TPU_NAME": "from-env"},
        unset=("ZONE", "ACCELERATOR"),
    )
    assert res.rc == 0, res.err
    (create,) = res.cmds
    assert create[5] == "from-env"
    assert flag_value(create, "--zone") == "europe-west4-a"
    assert flag_value(create, "--runtime-version") == "v2-alpha-tpuv6e"
    assert "--spot" in create
    res = sh(
        "setup.sh",
        "--no-install",
        env={"TPU_ENV_FILE": str(env_file), "GIT_URL": "https://example.com/m.git"},
    )
    assert res.rc == 0, res.err
    assert "fetch --quiet --force origin 'abc#keep';" in flag_value(res.cmds[0], "--command")


def test_env_file_values_with_spaces_must_be_quoted(sh, tmp_path):
    env_file = tmp_path / "spaces.env"
    env_file.write_text('SSH_FLAGS="--tunnel-through-iap --internal-ip"\n')
    res = sh("status.sh", "--no-workers", env={"TPU_ENV_FILE": str(env_file)})
    assert res.rc == 0, res.err
    env_file.write_text("SSH_FLAGS=--tunnel-through-iap --internal-ip\n")
    res = sh("status.sh", "--no-workers", env={"TPU_ENV_FILE": str(env_file)})
    assert res.rc != 0 and f"{env_file}:1" in res.err and res.cmds == []


def test_ssh_flags_reach_every_ssh_and_scp(sh):
    res = sh("setup.sh", env={"SSH_FLAGS": "--tunnel-through-iap --internal-ip"})
    assert res.rc == 0, res.err
    assert len(res.cmds) == 3
    for cmd in res.cmds:
        assert "--tunnel-through-iap" in cmd and "--internal-ip" in cmd


def test_env_file_unknown_key_names_file_and_line(sh, tmp_path):
    env_file = tmp_path / "bad.env"
    env_file.write_text("TPU_NAME=x\nZONEE=us-east5-a\n")
    res = sh("create.sh", env={"TPU_ENV_FILE": str(env_file)})
    assert res.rc != 0 and f"{env_file}:2" in res.err and "ZONEE" in res.err


def test_env_file_is_parsed_not_executed(sh, tmp_path):
    pwned = tmp_path / "pwned"
    env_file = tmp_path / "evil.env"
    env_file.write_text(f"TPU_NAME=$(touch {pwned})\n")
    res = sh("create.sh", "--no-wait", env={"TPU_ENV_FILE": str(env_file)}, unset=("TPU_NAME",))
    assert not pwned.exists()
    assert res.rc != 0 and "TPU_NAME" in res.err  # the literal text is not a valid name


def test_missing_explicit_env_file_is_an_error(sh, tmp_path):
    res = sh("status.sh", env={"TPU_ENV_FILE": str(tmp_path / "nope.env")})
    assert res.rc != 0 and "nope.env" in res.err


def test_committed_example_env_file_is_valid(sh):
    res = sh(
        "create.sh",
        "--no-wait",
        env={"TPU_ENV_FILE": str(TPU / "tpu.env.example")},
        unset=tuple(SLICE),
    )
    assert res.rc == 0, res.err
    assert flag_value(res.cmds[0], "--accelerator-type") == "v5p-32"


def test_user_env_file_is_gitignored():
    lines = (REPO / ".gitignore").read_text().splitlines()
    assert "tpu/tpu.env" in lines


# --------------------------------------------------------------------------- sandbox helpers


def make_bin(tmp_path: Path, tools: list[str], fakes: dict[str, str]) -> Path:
    """A PATH dir holding only `tools` (symlinks to the real ones) and the `fakes` scripts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        real = shutil.which(tool)
        if real is None:
            pytest.skip(f"{tool} not installed")
        (bin_dir / tool).symlink_to(real)
    for name, body in fakes.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(0o755)
    return bin_dir


BASE_TOOLS = ["bash", "sh", "hostname", "mkdir", "ln", "cat", "date", "rm", "sleep", "seq"]
FAKE_CURL = "#!/bin/sh\necho 3\n"  # metadata server: this is worker 3
FAKE_MELJAX = '#!/bin/sh\nfor a in "$@"; do printf \'<%s>\\n\' "$a"; done\n'


def run_remote(command: str, home: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    """Run a --command=... text like a worker's login shell would."""
    return subprocess.run(
        ["bash", "-c", command],
        env={"HOME": str(home), "PATH": str(bin_dir), "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=home,
    )


def fake_worker_home(tmp_path: Path) -> Path:
    home = tmp_path / "worker-home"
    (home / "meljax").mkdir(parents=True)
    (home / "meljax-venv" / "bin").mkdir(parents=True)
    (home / "meljax-venv" / "bin" / "activate").write_text("export MELJAX_VENV_ACTIVE=1\n")
    return home


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------- run


TRICKY_ARGS = [
    "--config=configs/qwen3_paper.py:8b,mel",
    "--workdir=gs://bucket/runs/qwen3-8b-mel",
    "--config.run.note=hello world",
    '--config.tag=it\'s "quoted" $HOME `x`',
]


def test_run_starts_command_on_all_workers_with_per_worker_log(sh):
    res = sh("run.sh", "--name", "exp1", "--", "meljax", "train", *TRICKY_ARGS)
    assert res.rc == 0, res.err
    (ssh,) = ssh_cmds(res)
    assert len(res.cmds) == 1
    assert ssh[5] == "meljax-v5p"
    assert flag_value(ssh, "--worker") == "all"
    assert ssh[7:9] == LOC
    remote = flag_value(ssh, "--command")
    assert "meljax-logs" in remote and "exp1" in remote
    assert "LOG=$D/worker-$ID.log" in remote
    assert "tmux new-session -d -s meljax" in remote and "nohup" in remote


@pytest.mark.parametrize("with_tmux", [True, False], ids=["tmux", "nohup"])
def test_run_remote_command_passes_arguments_exactly(sh, tmp_path, with_tmux):
    res = sh(
        "run.sh",
        "--name",
        "exp1",
        "--env",
        "XLA_FLAGS=--a b",
        "--",
        "meljax",
        "train",
        *TRICKY_ARGS,
    )
    remote = flag_value(ssh_cmds(res)[0], "--command")
    home = fake_worker_home(tmp_path)
    fakes = {
        "curl": FAKE_CURL,
        "meljax": FAKE_MELJAX.replace(
            "for a", 'echo "venv=$MELJAX_VENV_ACTIVE xla=$XLA_FLAGS pwd=$(pwd)"; for a'
        ),
    }
    tools = BASE_TOOLS + ["setsid", "nohup"]
    if with_tmux:
        # Runs the session command synchronously, like a tmux server would in the background.
        fakes["tmux"] = (
            "#!/bin/bash\ncase $1 in\n  has-session) exit 1 ;;\n"
            '  new-session) echo "$4" > "$HOME/tmux-session"; exec sh -c "$5" ;;\n'
            "  *) exit 2 ;;\nesac\n"
        )
    bin_dir = make_bin(tmp_path, tools, fakes)
    proc = run_remote(remote, home, bin_dir)
    assert proc.returncode == 0, proc.stderr
    log = home / "meljax-logs" / "exp1" / "worker-3.log"
    assert "worker 3: started run exp1" in proc.stdout
    assert wait_for(lambda: log.exists() and "exit status" in log.read_text())
    text = log.read_text()
    args = [line[1:-1] for line in text.splitlines() if line.startswith("<")]
    assert args == ["train", *TRICKY_ARGS]
    assert f"venv=1 xla=--a b pwd={home / 'meljax'}" in text
    assert "exit status 0" in text
    assert os.readlink(home / "meljax-logs" / "latest") == "exp1"
    if with_tmux:
        assert (home / "tmux-session").read_text().strip() == "meljax"


def test_run_refuses_when_a_run_is_active(sh, tmp_path):
    res = sh("run.sh", "--name", "exp2", "--", "meljax", "train")
    remote = flag_value(ssh_cmds(res)[0], "--command")
    home = fake_worker_home(tmp_path)
    fakes = {"curl": FAKE_CURL, "meljax": FAKE_MELJAX, "tmux": "#!/bin/sh\nexit 0\n"}
    proc = run_remote(remote, home, make_bin(tmp_path, BASE_TOOLS, fakes))
    assert proc.returncode != 0
    assert "already active" in proc.stderr
    assert not (home / "meljax-logs" / "exp2").exists()


def test_run_adds_workdir_setting_and_meljax_prefix(sh, tmp_path):
    res = sh("run.sh", "--name", "r", "train", "--config=c.py", env={"WORKDIR": "gs://b/w x"})
    assert res.rc == 0, res.err
    remote = flag_value(ssh_cmds(res)[0], "--command")
    home = fake_worker_home(tmp_path)
    bin_dir = make_bin(
        tmp_path, BASE_TOOLS + ["setsid", "nohup"], {"curl": FAKE_CURL, "meljax": FAKE_MELJAX}
    )
    assert run_remote(remote, home, bin_dir).returncode == 0
    log = home / "meljax-logs" / "r" / "worker-3.log"
    assert wait_for(lambda: log.exists() and "exit status" in log.read_text())
    args = [line[1:-1] for line in log.read_text().splitlines() if line.startswith("<")]
    assert args == ["train", "--config=c.py", "--workdir=gs://b/w x"]


def test_run_keeps_users_workdir(sh):
    res = sh(
        "run.sh",
        "--name",
        "r",
        "--",
        "meljax",
        "train",
        "--workdir=gs://mine",
        env={"WORKDIR": "gs://setting"},
    )
    remote = flag_value(ssh_cmds(res)[0], "--command")
    assert "gs://mine" in remote and "gs://setting" not in remote


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--name", "a b", "meljax", "train"],
        ["--name", "latest", "meljax", "train"],
        ["--env", "1BAD=x", "meljax", "train"],
    ],
)
def test_run_rejects_bad_input(sh, args):
    res = sh("run.sh", *args)
    assert res.rc != 0 and res.cmds == []


# --------------------------------------------------------------------------- stop


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_stop_kills_the_run_started_by_run_sh(sh, tmp_path):
    start = sh("run.sh", "--name", "long", "--", "meljax", "train")
    stop = sh("stop.sh")
    assert stop.rc == 0, stop.err
    (stop_ssh,) = ssh_cmds(stop)
    assert flag_value(stop_ssh, "--worker") == "all"
    stop_remote = flag_value(stop_ssh, "--command")
    assert "tmux kill-session -t meljax" in stop_remote

    home = fake_worker_home(tmp_path)
    pid_file = tmp_path / "meljax.pid"
    sleeper = f"#!/bin/sh\necho $$ > '{pid_file}'\nexec sleep 60\n"
    bin_dir = make_bin(
        tmp_path, BASE_TOOLS + ["setsid", "nohup"], {"curl": FAKE_CURL, "meljax": sleeper}
    )
    assert run_remote(flag_value(ssh_cmds(start)[0], "--command"), home, bin_dir).returncode == 0
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
    pid = int(pid_file.read_text())
    try:
        assert process_alive(pid)
        proc = run_remote(stop_remote, home, bin_dir)
        assert proc.returncode == 0, proc.stderr
        assert "stopped" in proc.stdout
        assert wait_for(lambda: not process_alive(pid), timeout=5)
        assert not (home / "meljax-logs" / "current.pid").exists()
        # A second stop finds nothing and still succeeds.
        again = run_remote(stop_remote, home, bin_dir)
        assert again.returncode == 0 and "no meljax run found" in again.stdout
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_stop_force_frees_tpu_devices(sh):
    res = sh("stop.sh", "--force", "--grace", "5")
    remote = flag_value(ssh_cmds(res)[0], "--command")
    assert "lsof -t /dev/accel* /dev/vfio/*" in remote and "seq 5" in remote


# --------------------------------------------------------------------------- logs / status


def test_logs_default_worker_zero_and_all(sh):
    res = sh("logs.sh")
    (ssh,) = ssh_cmds(res)
    assert flag_value(ssh, "--worker") == "0"
    remote = flag_value(ssh, "--command")
    assert "meljax-logs/latest/worker-*.log" in remote and "tail -n 100 -F" in remote
    res = sh("logs.sh", env={"WORKER": "all", "RUN_NAME": "exp1"})
    (ssh,) = ssh_cmds(res)
    assert flag_value(ssh, "--worker") == "all"
    assert "meljax-logs/exp1/worker-*.log" in flag_value(ssh, "--command")
    assert sh("logs.sh", env={"WORKER": "two"}).rc != 0


def test_logs_remote_prints_prefixed_tail(sh, tmp_path):
    res = sh("logs.sh", "-n", "2", "--no-follow", "--run", "exp1")
    remote = flag_value(ssh_cmds(res)[0], "--command")
    home = tmp_path / "worker-home"
    (home / "meljax-logs" / "exp1").mkdir(parents=True)
    (home / "meljax-logs" / "exp1" / "worker-3.log").write_text("a\nstep 1\nstep 2\n")
    proc = run_remote(remote, home, make_bin(tmp_path, BASE_TOOLS + ["tail", "sed"], {}))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[worker 3] step 1\n[worker 3] step 2\n"
    missing = sh("logs.sh", "--no-follow", "--run", "nope")
    proc = run_remote(flag_value(ssh_cmds(missing)[0], "--command"), home, tmp_path / "bin")
    assert proc.returncode != 0 and "no log for run nope" in proc.stderr


def test_status_shows_queued_resource_node_and_workers(sh):
    res = sh("status.sh")
    assert res.rc == 0, res.err
    qr, node, ssh = res.cmds
    assert qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "meljax-v5p"]
    assert node[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "meljax-v5p"]
    assert flag_value(ssh, "--worker") == "all"
    remote = flag_value(ssh, "--command")
    assert "tmux ls" in remote and "pgrep" in remote
    assert len(sh("status.sh", "--no-workers").cmds) == 2


# --------------------------------------------------------------------------- setup


def test_setup_local_copies_tarball_to_all_workers(sh, tmp_path):
    res = sh("setup.sh")
    assert res.rc == 0, res.err
    scp, unpack, install = res.cmds
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--recurse" in scp and flag_value(scp, "--worker") == "all"
    assert scp[-1] == "meljax-v5p:meljax-src.tar.gz"
    for cmd in (unpack, install):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "meljax-v5p"]
        assert flag_value(cmd, "--worker") == "all"
    install_remote = flag_value(install, "--command")
    assert 'pip install --quiet -e ".[tpu]"' in install_remote
    assert '"$HOME"/meljax-venv/bin/python -m pip' in install_remote

    # The unpack step replaces the old code and removes the tarball.
    home = tmp_path / "worker-home"
    (home / "meljax").mkdir(parents=True)
    (home / "meljax" / "stale.py").write_text("old")
    payload = tmp_path / "payload"
    (payload / "meljax").mkdir(parents=True)
    (payload / "pyproject.toml").write_text("[project]\n")
    subprocess.run(
        ["tar", "-czf", str(home / "meljax-src.tar.gz"), "-C", str(payload), "."], check=True
    )
    bin_dir = make_bin(tmp_path, BASE_TOOLS + ["tar", "gzip"], {})
    proc = run_remote(flag_value(unpack, "--command"), home, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert (home / "meljax" / "pyproject.toml").exists()
    assert not (home / "meljax" / "stale.py").exists()
    assert not (home / "meljax-src.tar.gz").exists()


def test_setup_git_clones_and_updates_ref(sh, tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git not installed")
    origin = tmp_path / "origin"
    genv = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
    }

    def g(*args):
        subprocess.run([git, "-C", str(origin), *args], check=True, env=genv, capture_output=True)

    origin.mkdir()
    g("init", "-q")
    (origin / "VERSION").write_text("one\n")
    g("add", "VERSION")
    g("commit", "-qm", "one")
    g("tag", "v1")
    (origin / "VERSION").write_text("two\n")
    g("commit", "-qam", "two")
    g("tag", "v2")

    home = tmp_path / "worker-home"
    home.mkdir()
    bin_dir = make_bin(tmp_path, BASE_TOOLS + ["git", "mv"], {})
    for ref, expected in (("v1", "one\n"), ("v2", "two\n"), ("v1", "one\n")):
        res = sh("setup.sh", "--no-install", env={"GIT_URL": str(origin), "GIT_REF": ref})
        assert res.rc == 0, res.err
        (ssh,) = res.cmds  # no scp in git mode
        assert flag_value(ssh, "--worker") == "all"
        proc = run_remote(flag_value(ssh, "--command"), home, bin_dir)
        assert proc.returncode == 0, proc.stderr
        assert (home / "meljax" / "VERSION").read_text() == expected


def test_setup_git_mode_requires_url(sh):
    res = sh("setup.sh", "--git")
    assert res.rc != 0 and "GIT_URL" in res.err and res.cmds == []


def test_setup_weights_from_gcs_and_local(sh, tmp_path):
    local = tmp_path / "Qwen3-8B"
    local.mkdir()
    res = sh(
        "setup.sh", "--no-install", "--weights", "gs://bkt/hf/Qwen3-4B/", "--weights", str(local)
    )
    assert res.rc == 0, res.err
    gcs = flag_value(res.cmds[2], "--command")
    assert 'gcloud storage rsync --recursive gs://bkt/hf/Qwen3-4B "$HOME"/models/Qwen3-4B' in gcs
    scp = res.cmds[4]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--recurse" in scp
    assert scp[-2:] == [str(local), "meljax-v5p:models/"]
    res = sh("setup.sh", "--no-install", "--weights", str(tmp_path / "missing"))
    assert res.rc != 0 and "missing" in res.err


@pytest.mark.parametrize("bad", ["/", "~", "..", "a/../b", "x y", "/home"])
def test_setup_refuses_dangerous_remote_dir(sh, bad):
    res = sh("setup.sh", env={"REMOTE_DIR": bad})
    assert res.rc != 0 and "REMOTE_DIR" in res.err and res.cmds == []


# --------------------------------------------------------------------------- delete


def test_delete_asks_for_confirmation(sh):
    no = sh("delete.sh", stdin="n\n")
    assert no.rc != 0 and no.cmds == [] and "not confirmed" in no.err
    eof = sh("delete.sh", stdin="")
    assert eof.rc != 0 and eof.cmds == []
    yes = sh("delete.sh", stdin="y\n")
    assert yes.rc == 0, yes.err
    (delete,) = yes.cmds
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "meljax-v5p"]
    assert "--force" in delete and "--quiet" in delete and delete[6:8] == LOC


def test_delete_yes_skips_question_but_not_from_env_file(sh, tmp_path):
    assert len(sh("delete.sh", env={"YES": "1"}).cmds) == 1
    assert len(sh("delete.sh", "--yes").cmds) == 1
    env_file = tmp_path / "yes.env"
    env_file.write_text("YES=1\n")
    res = sh("delete.sh", env={"TPU_ENV_FILE": str(env_file)})
    assert res.rc != 0 and "YES" in res.err and res.cmds == []


# --------------------------------------------------------------------------- shellcheck


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck); dry-run tests ran")
    files = sorted(str(p) for p in TPU.glob("*.sh"))
    assert len(files) == len(SCRIPTS) + 1  # + common.sh
    proc = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
