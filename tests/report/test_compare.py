"""Held-out results with 95% intervals, the report's held-out panels and ``meljax compare``."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest

from meljax.evaluation import stats
from meljax.report import heldout
from meljax.report.compare import compare, markdown_table, run_row
from meljax.report.compare import load_run as load_compared_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# ----------------------------------------------------------------------------- intervals


def test_wilson_interval_matches_published_values():
    # 5 of 10: the textbook Wilson 95% interval [0.2366, 0.7634]; 0 of 6: [0, 0.3903]
    lo, hi = stats.wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = stats.wilson_interval(0, 6)
    assert lo == 0.0 and hi == pytest.approx(0.3903, abs=1e-4)
    assert stats.wilson_interval(6, 6)[1] == 1.0


def test_mean_interval_and_paired_gain_by_hand():
    # values 0.25, 0.5, 0.75: mean 0.5, sample sd 0.25, se 0.25/sqrt(3)
    low, high, se = stats.mean_interval([0.25, 0.5, 0.75])
    half = 1.959963984540054 * 0.25 / math.sqrt(3)
    assert (low, high, se) == pytest.approx((0.5 - half, 0.5 + half, 0.25 / math.sqrt(3)))
    assert stats.mean_interval([0.0, 0.5, 1.0])[0] == 0.0  # clipped to [0, 1]
    # one value: no spread, so the Wilson interval of one problem (as meljax eval stores)
    assert stats.mean_interval([0.25])[:2] == stats.wilson_interval(0.25, 1)
    before = heldout.HeldOut(
        0,
        "b",
        None,
        None,
        per_problem={"a": (0.0, 0.0), "b": (1.0, 0.5), "c": (0.0, None), "x": (1.0, 1.0)},
    )
    after = heldout.HeldOut(9, "b", None, None, per_problem={"a": (1.0, 0.5), "b": (1.0, 1.0),
                                                            "c": (1.0, None), "y": (0.0, 0.0)})  # fmt: skip
    g = heldout.paired_gain(before, after, "greedy")  # differences 1, 0, 1 on a, b, c
    d = [1.0, 0.0, 1.0]
    sd = math.sqrt(sum((x - 2 / 3) ** 2 for x in d) / 2)
    assert g.value == pytest.approx(2 / 3) and g.n == 3
    assert g.value - g.low == pytest.approx(1.959963984540054 * sd / math.sqrt(3))
    assert g.high == 1.0  # clipped to the largest possible gain
    s = heldout.paired_gain(before, after, "sampled")  # differences 0.5, 0.5 (c has none)
    assert (s.value, s.low, s.high, s.n) == (0.5, 0.5, 0.5, 2)


def write_eval(workdir, step, benchmarks, records, average=None):
    folder = os.path.join(workdir, "eval")
    os.makedirs(folder, exist_ok=True)
    report = {
        "benchmarks": benchmarks,
        "average": average or next(iter(benchmarks.values())),
        "records_file": f"step_{step}.records.jsonl",
    }
    with open(os.path.join(folder, f"step_{step}.json"), "w") as f:
        json.dump(report, f)
    with open(os.path.join(folder, f"step_{step}.records.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def rec(bench, pid, greedy, correct, n=4):
    return {"benchmark": bench, "id": pid, "greedy_correct": greedy, "num_samples": n,
            "num_correct": correct}  # fmt: skip


def test_intervals_from_records_or_from_the_report(tmp_path):
    workdir = str(tmp_path)
    # step 0: no interval stored -> Wilson from the records (5 of 10), normal for avg@4
    recs0 = [rec("b", f"p{i}", i < 5, i % 5) for i in range(10)]
    m0 = {"num_problems": 10, "pass@1": 0.5, "avg@4": 0.5, "num_samples": 4}
    write_eval(workdir, 0, {"b": m0}, recs0)
    # step 7: the report stores its intervals (two spellings) -> read as they are
    recs7 = [rec("b", f"p{i}", i < 8, 4) for i in range(10)]
    m7 = {"num_problems": 10, "pass@1": 0.8, "avg@4": 1.0, "num_samples": 4,
          "pass@1_ci95": [0.5, 0.9], "ci95": {"avg@4": {"low": 0.9, "high": 1.0}}}  # fmt: skip
    write_eval(workdir, 7, {"b": m7}, recs7)
    results = heldout.read_heldout(workdir)
    assert list(results) == [0, 7]
    b0 = results[0]["b"]
    assert (b0.greedy.low, b0.greedy.high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    fractions = [(i % 5) / 4 for i in range(10)]
    low, high, _ = stats.mean_interval(fractions)
    assert (b0.sampled.value, b0.sampled.low, b0.sampled.high) == (0.5, low, high)
    b7 = results[7]["b"]
    assert (b7.greedy.low, b7.greedy.high, b7.sampled.low, b7.sampled.high) == (
        0.5, 0.9, 0.9, 1.0)  # fmt: skip
    # one benchmark: the average is that benchmark
    assert results[7][heldout.AVERAGE].greedy == b7.greedy
    first, last = heldout.before_after(results)
    assert (first.step, last.step) == (0, 7)
    gain = heldout.gain_for(results, "greedy")  # p5, p6, p7 went from wrong to right
    assert gain.value == pytest.approx(0.3) and gain.n == 10
    lines = heldout.before_after_text(results)
    assert lines[0] == "step 0 -> step 7 (95% intervals)"
    assert lines[1].startswith("greedy   50.0% [23.7, 76.3] -> 80.0% [50.0, 90.0]  gain +30.0")


def test_average_of_two_benchmarks_combines_their_errors(tmp_path):
    workdir = str(tmp_path)
    ma = {"num_problems": 10, "pass@1": 0.5, "num_samples": 0}
    mb = {"num_problems": 6, "pass@1": 0.0, "num_samples": 0}
    recs = [rec("a", f"p{i}", i < 5, 0, n=0) for i in range(10)]
    recs += [rec("b", f"q{i}", False, 0, n=0) for i in range(6)]
    write_eval(workdir, 3, {"a": ma, "b": mb}, recs, average={"pass@1": 0.25, "num_samples": 0})
    res = heldout.read_heldout(workdir)[3]
    a, b, avg = res["a"].greedy, res["b"].greedy, res[heldout.AVERAGE].greedy
    z = stats.Z95
    se = math.hypot((a.high - a.low) / (2 * z), (b.high - b.low) / (2 * z)) / 2
    assert avg.value == 0.25 and avg.n == 16
    assert (avg.low, avg.high) == pytest.approx((0.25 - z * se, 0.25 + z * se))
    assert res[heldout.AVERAGE].sampled is None


def test_metrics_only_evaluation_gives_curves_without_intervals(tmp_path):
    rows = [{"step": 2, "eval/sums/pass@1": 0.25, "eval/sums/avg@4": 0.5,
             "eval/average/pass@1": 0.25, "eval/average/avg@4": 0.5}]  # fmt: skip
    res = heldout.read_heldout(str(tmp_path), rows)
    assert res[2]["sums"].greedy == heldout.Estimate(0.25)
    assert res[2][heldout.AVERAGE].sampled.value == 0.5 and res[2]["sums"].num_samples == 4
    assert heldout.before_after_text(res) == [
        "step 2 (95% intervals)", "greedy   25.0%", "avg@4    50.0%"]  # fmt: skip
    rows[0]["eval/sums/pass@1_ci_low"], rows[0]["eval/sums/pass@1_ci_high"] = 0.1, 0.6
    res = heldout.read_heldout(str(tmp_path), rows)
    assert res[2]["sums"].greedy == heldout.Estimate(0.25, 0.1, 0.6)


# ----------------------------------------------------------------------------- two tiny runs


def meljax(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "meljax", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_compare_two_tiny_runs_writes_figure_and_table(tiny_eval_runs, tmp_path):
    grpo, mel = tiny_eval_runs
    prefix = str(tmp_path / "out" / "grpo_vs_mel")
    out = meljax("compare", grpo, mel, f"--output={prefix}")
    assert png_size(prefix + ".png") == (1800, 1000)
    assert os.path.getsize(prefix + ".png") > 40_000
    with open(prefix + ".md") as f:
        table = f.read()
    assert table.strip() in out and "| grpo | grpo |" in table and "| mel | grpo+mel |" in table
    with open(prefix + ".json") as f:
        rows = json.load(f)["runs"]
    assert [r["run"] for r in rows] == ["grpo", "mel"]
    for row, workdir in zip(rows, tiny_eval_runs, strict=True):
        assert row["steps"] == 2 and row["seed"] == 0 and row["heldout_steps"] == [1, 2]
        for step, side in ((1, "before"), (2, "after")):
            with open(os.path.join(workdir, "eval", f"step_{step}.json")) as f:
                report = json.load(f)["benchmarks"]["sums"]
            greedy = row[f"heldout_greedy_{side}"]
            assert greedy["value"] == report["pass@1"] and greedy["n"] == 6
            assert greedy["low"] <= greedy["value"] <= greedy["high"]
            assert row[f"heldout_sampled_{side}"]["value"] == pytest.approx(report["avg@4"])
        assert row["heldout_greedy_gain"] is not None
    assert rows[0]["generated"] is None and rows[1]["generated"] is not None
    # the same rows through the library
    assert markdown_table([run_row(load_compared_run(w)) for w in tiny_eval_runs]) == table.strip()
    # default output: the runs' common parent folder
    result = compare(list(tiny_eval_runs))
    assert result.png == os.path.join(os.path.dirname(grpo), "compare.png")


def test_report_shows_heldout_before_and_after(tiny_eval_runs, tmp_path):
    png = str(tmp_path / "report.png")
    out = meljax("report", f"--workdir={tiny_eval_runs[1]}", f"--output={png}")
    assert png_size(png) == (1300, 1450)  # eight panels: the held-out row added
    assert "held-out, step 1 -> step 2 (95% intervals)" in out
    results = heldout.read_heldout(tiny_eval_runs[1])
    first, last = heldout.before_after(results)
    assert f"greedy   {first.greedy.text()} -> {last.greedy.text()}" in out


def test_training_prints_each_held_out_evaluation(tiny_eval_runs):
    """The minutes of a held-out evaluation are announced, and its result printed with the
    intervals that `meljax report` shows."""
    with open(f"{tiny_eval_runs[1]}.stdout") as f:
        out = f.read()
    results = heldout.read_heldout(tiny_eval_runs[1])
    for step in (1, 2):
        assert f"held-out evaluation, step {step} ..." in out
        average = results[step]["average"]
        line = f"held-out evaluation, step {step}: greedy {average.greedy.text()}, "
        assert line + f"avg@4 {average.sampled.text()} (" in out


def test_compare_errors_are_clear(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "meljax", "compare", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "no metrics file" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "meljax", "compare"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert proc.returncode != 0 and "run folders" in proc.stderr
