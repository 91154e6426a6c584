"""``meljax eval`` / ``meljax sample`` read a training config: ``--config`` plus
``--config.SECTION.FIELD=VALUE`` overrides, as ``meljax train`` does (issue 25)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUMS = os.path.join(REPO, "tests", "fixtures", "eval", "sums", "test.jsonl")


def meljax(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "meljax", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_eval_takes_a_shipped_config_and_its_overrides(tmp_path):
    out = tmp_path / "report.json"
    proc = meljax(
        "eval",
        "--config=tiny",  # a random tiny model: no files
        f"--config.eval.benchmarks={SUMS}",
        "--config.eval.limit=2",
        "--config.eval.num_samples=3",
        "--config.eval.max_new_tokens=4",
        "--config.data.system_prompt=Be brief.",
        f"--output={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    with open(SUMS) as f:
        assert sum(1 for line in f if line.strip()) > 2
    assert report["benchmarks"]["sums"]["num_problems"] == 2  # eval.limit
    assert report["config"]["num_samples"] == 3 and report["config"]["max_new_tokens"] == 4
    meta = report["meta"]
    assert meta["system_prompt"] == "Be brief."  # the data section renders the prompts
    assert meta["answer_mode"] == "last_number"  # tiny's reward section
    assert meta["config"].endswith("tiny.py") and meta["config_overrides"]["eval.limit"] == 2
    records = (tmp_path / "report.records.jsonl").read_text().splitlines()
    assert len(records) == 2
    assert all(len(json.loads(r)["sample_extracted"]) == 3 for r in records)


def test_a_misspelt_override_is_one_line_and_exit_2(tmp_path):
    for command, *rest in (("eval",), ("sample", "--prompt=x")):
        proc = meljax(command, "--config=tiny", "--config.eval.limt=3", *rest, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith(f"meljax {command}: error: ")
        assert "eval.limt" in lines[0] and "did you mean eval.limit?" in lines[0]


def test_bad_values_and_flag_mixes_exit_2(tmp_path):
    proc = meljax(
        "eval", "--config=tiny", f"--config.eval.benchmarks={SUMS}", "--config.eval.limit=-1",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "eval.limit=-1 must be at least 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = meljax("eval", "--config=tiny", f"--workdir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and "not --config" in proc.stderr
    proc = meljax("eval", f"--workdir={tmp_path}", "--config.model.path=demo", cwd=tmp_path)
    assert proc.returncode == 2 and "--config.model.path: with --workdir" in proc.stderr
    proc = meljax("eval", "--config=tiny", cwd=tmp_path)
    assert proc.returncode == 2 and "eval.benchmarks is empty" in proc.stderr


def test_sample_renders_and_samples_as_the_config_says(tmp_path):
    proc = meljax(
        "sample", "--config=tiny", "--prompt=What is 1 plus 1?", "--prompt=Hi", "--num_samples=2",
        "--config.rollout.max_new_tokens=3", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "=== prompt 1: Hi" in proc.stdout
    assert proc.stdout.count("--- sample 1 (") == 2  # two prompts, two samples each
    assert "engine: " in proc.stdout
