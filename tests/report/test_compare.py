"""Held-out results with 95% intervals, the report's held-out panels and ``meljax compare``."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest

from meljax.evaluation import (
    EvalConfig,
    EvalReport,
    ProblemRecord,
    benchmark_metrics,
    macro_average,
    stats,
)
from meljax.report import arms, heldout
from meljax.report.compare import compare, markdown_table, run_row
from meljax.report.compare import load_run as load_compared_run
from meljax.trainer.metrics import MetricsWriter

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


# ----------------------------------------------------------------------------- arms of seeds

# 10 problems of one benchmark, k = 4 samples. Step 0: the same model in every run; step 10:
# GRPO the same in every seed, MEL = GRPO + a planted per-problem difference per seed.
GREEDY_0 = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
COUNTS_0 = [1] * 10
GREEDY_GRPO = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
COUNTS_GRPO = [2] * 10
GREEDY_DIFF = {  # MEL minus GRPO per problem: seed means 0.2, 0.1, 0.3
    0: [0, 1, 0, 1, 0, 0, 0, 0, 0, 0],
    1: [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    2: [0, 1, 0, 1, 0, 1, 0, 1, -1, 0],
    3: [0, 1, 0, 1, 0, 1, 0, 1, 0, 1],  # seed 3: MEL only, must not count
}
COUNT_DIFF = {  # in correct samples of 4
    0: [1, 1, 0, 0, 2, 0, 0, 0, 0, 0],
    1: [0, 0, 1, 0, 0, 0, 0, -1, 0, 0],
    2: [2, 2, 1, 0, 0, 1, 0, 0, 0, -2],
    3: [2, 2, 2, 2, 2, 2, 2, 2, 2, 2],
}
LAMBDA_MEL = 0.5


def write_eval_report(workdir, step, greedy, counts):
    """``eval/step_<step>.json`` and its records, written by the evaluation's own writer."""
    records = [
        ProblemRecord(benchmark="sums", id=f"p{i}", question=f"{i} + 1?", answer=str(i + 1),
                      prompt_tokens=5, greedy_correct=bool(g), greedy_tokens=3,
                      greedy_truncated=False, num_samples=4, num_correct=c,
                      sample_correct=[j < c for j in range(4)])
        for i, (g, c) in enumerate(zip(greedy, counts, strict=True))
    ]  # fmt: skip
    metrics = benchmark_metrics(records, 4, (4,))
    report = EvalReport(EvalConfig(benchmarks="sums", num_samples=4), {"sums": metrics},
                        macro_average([metrics]), records)  # fmt: skip
    report.write(os.path.join(workdir, "eval", f"step_{step}.json"))


def synthetic_run(root, arm, seed, steps=10):
    """A finished run folder: config.json, metrics.jsonl (steps 1..steps), step 0 and last
    evaluation. MEL steps alternate a kept row (NLL 0.3) and none; GRPO / MEL steps take 2 /
    3 s after a first (compiling) step of 20 / 25 s."""
    mel = arm == "mel"
    workdir = os.path.join(str(root), f"{arm}_s{seed}")
    os.makedirs(workdir)
    config = {"seed": seed, "algorithm": {"name": "grpo"},
              "mel": {"enabled": mel, "lambda_mel": LAMBDA_MEL}}  # fmt: skip
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    writer = MetricsWriter(workdir, tensorboard=False)
    for step in range(1, steps + 1):
        policy = 0.1 if step % 2 else -0.1
        m = {"reward_mean": 0.1 * step, "time/step": (25.0 if mel else 20.0) if step == 1 else
             (3.0 if mel else 2.0), "train/policy_loss": policy}  # fmt: skip
        if mel:
            nll, rows = (0.3, 1.0) if step % 2 else (0.0, 0.0)
            m |= {"mel/generated": 4.0, "mel/kept": rows, "retention_ratio": rows / 4,
                  "train/mel_nll": nll, "train/mel_rows": rows, "train/mel_tokens": 9 * rows,
                  "train/loss": policy + LAMBDA_MEL * nll}  # fmt: skip
        else:
            m["train/loss"] = policy
        writer.write(step, m)
    writer.close()
    write_eval_report(workdir, 0, GREEDY_0, COUNTS_0)
    greedy, counts = GREEDY_GRPO, COUNTS_GRPO
    if mel:
        greedy = [a + d for a, d in zip(greedy, GREEDY_DIFF[seed], strict=True)]
        counts = [a + d for a, d in zip(counts, COUNT_DIFF[seed], strict=True)]
    assert all(g in (0, 1) for g in greedy) and all(0 <= c <= 4 for c in counts)
    write_eval_report(workdir, steps, greedy, counts)
    return workdir


@pytest.fixture
def seed_runs(tmp_path):
    """``{"grpo": [seeds 0, 1, 2], "mel": [seeds 0, 1, 2, 3]}`` run folders."""
    return {"grpo": [synthetic_run(tmp_path, "grpo", s) for s in (0, 1, 2)],
            "mel": [synthetic_run(tmp_path, "mel", s) for s in (0, 1, 2, 3)]}  # fmt: skip


def by_hand(diffs):
    """The three intervals of meljax.report.arms from the module docstring's formulas."""
    cells = [x for d in diffs for x in d]
    n, s = len(cells), len(diffs)
    value = sum(cells) / n
    sd = math.sqrt(sum((x - value) ** 2 for x in cells) / (n - 1))
    means = [sum(d) / len(d) for d in diffs]
    center = sum(means) / s
    var_means = sum((m - center) ** 2 for m in means) / (s - 1)
    within = sum(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)
                 for d, m in zip(diffs, means, strict=True)) / s**2  # fmt: skip
    return {
        "value": value,
        "over_cells": stats.Z95 * sd / math.sqrt(n),
        "over_seeds": arms.t_quantile(s - 1) * math.sqrt(var_means / s),
        "two_level": stats.Z95 * math.sqrt(var_means / s + within),
        "center": center,
    }


def check_interval(got, center, half):
    assert got["value"] == pytest.approx(center)
    assert (got["low"], got["high"]) == pytest.approx((center - half, center + half))
    assert got["low"] <= got["value"] <= got["high"]


def test_t_quantiles_match_scipy():
    t = pytest.importorskip("scipy.stats").t
    for df in (*range(1, 31), 31, 45, 200):
        assert arms.t_quantile(df) == pytest.approx(t.ppf(0.975, df), abs=2e-4)


def test_paired_difference_by_hand():
    # greedy differences with seed means 0.2, 0.1, 0.3: every figure written out
    d = {s: [float(x) for x in GREEDY_DIFF[s]] for s in (0, 1, 2)}
    got = arms.paired_difference(d)
    assert got["value"] == pytest.approx(0.2) and (got["seeds"], got["cells"]) == (3, 30)
    # (a) over seeds: sd of (0.2, 0.1, 0.3) is 0.1, t(0.975, 2) = 4.3027
    check_interval(got["over_seeds"], 0.2, 4.3027 * 0.1 / math.sqrt(3))
    assert got["over_seeds"]["df"] == 2
    # (b) over cells: 7 cells of +1, 1 of -1, 22 of 0 around 0.2
    sd = math.sqrt((7 * 0.8**2 + 1.2**2 + 22 * 0.2**2) / 29)
    check_interval(got["over_cells"], 0.2, stats.Z95 * sd / math.sqrt(30))
    # two-level: the seed means' variance / 3 plus each seed's within variance / 10 / 9
    within = (1.6 / 9 + 0.9 / 9 + (4 * 0.7**2 + 1.3**2 + 5 * 0.3**2) / 9) / 10 / 9
    check_interval(got["two_level"], 0.2, stats.Z95 * math.sqrt(0.01 / 3 + within))
    assert got["between_var"] == pytest.approx(0.01 / 3) and got["within_var"] == pytest.approx(
        within
    )
    assert (
        got["over_cells"]["high"] - got["over_cells"]["low"]
        < (got["two_level"]["high"] - got["two_level"]["low"])
        < got["over_seeds"]["high"] - got["over_seeds"]["low"]
    )
    # one seed: no between-seed variance, only the interval over cells
    one = arms.paired_difference({0: d[0], 5: []})
    assert one["seeds"] == 1 and one["two_level"] is None and one["over_seeds"] is None
    assert arms.paired_difference({}) is None


def test_arms_paired_by_seed_and_problem(seed_runs, tmp_path):
    result = compare(arms=[("grpo", seed_runs["grpo"]), ("mel", seed_runs["mel"])],
                     output=str(tmp_path / "out" / "arms"))  # fmt: skip
    (p,) = result.paired
    assert (p["a"], p["b"], p["seeds"], p["steps"]) == ("grpo", "mel", [0, 1, 2], {"0": 10,
                                                        "1": 10, "2": 10})  # fmt: skip
    # seed 3 ran in the MEL arm only: reported, left out of the paired figures
    assert [(x["seed"], x["arm"], x["run"]) for x in p["left_out"]] == [(3, "mel", "mel_s3")]
    greedy = by_hand([GREEDY_DIFF[s] for s in (0, 1, 2)])
    sampled = by_hand([[c / 4 for c in COUNT_DIFF[s]] for s in (0, 1, 2)])
    for kind, hand in (("greedy", greedy), ("sampled", sampled)):
        got = p[kind]
        assert got["value"] == pytest.approx(hand["value"]) and got["cells"] == 30
        check_interval(got["over_cells"], hand["value"], hand["over_cells"])
        check_interval(got["over_seeds"], hand["center"], hand["over_seeds"])
        check_interval(got["two_level"], hand["center"], hand["two_level"])
    assert greedy["value"] == pytest.approx(0.2)
    assert sampled["value"] == pytest.approx((4 + 0 + 4) / 4 / 30)  # sums of COUNT_DIFF
    assert p["step_time"] == pytest.approx({"a_s": 2.0, "b_s": 3.0, "extra_s": 1.0,
                                            "extra_pct": 50.0})  # fmt: skip
    grpo, mel = result.arms
    assert (grpo["arm"], grpo["seeds"], mel["seeds"]) == ("grpo", [0, 1, 2], [0, 1, 2, 3])
    assert grpo["nll_share"] is None and grpo["generated"] is None
    # MEL: half the steps carry 0.5 * 0.3 beside |policy loss| 0.1: share (0.6 + 0) / 2
    assert mel["nll_share"]["mean"] == pytest.approx(0.3) and mel["nll_share"]["sd"] == 0.0
    assert mel["mel_rows_per_step"]["mean"] == pytest.approx(0.5)
    assert mel["retention"]["mean"] == pytest.approx(0.125)
    assert (mel["kept"], mel["generated"]) == (4 * 5, 4 * 40)
    assert mel["step_time_s"] == {"mean": 3.0, "sd": 0.0, "n": 4}
    # gain from step 0: greedy 0.1 -> 0.5 in GRPO; MEL adds its seed's mean difference
    assert grpo["gain_greedy_from_0"]["mean"] == pytest.approx(0.4)
    assert grpo["gain_greedy_from_0"]["sd"] == pytest.approx(0.0, abs=1e-12)
    mel_gains = [0.4 + sum(GREEDY_DIFF[s]) / 10 for s in (0, 1, 2, 3)]
    assert mel["gain_greedy_from_0"]["mean"] == pytest.approx(sum(mel_gains) / 4)
    assert mel["heldout_greedy"]["mean"] == pytest.approx(sum(mel_gains) / 4 + 0.1)
    # the files: the runs' table stays, the arms' table and the paired lines follow
    with open(result.markdown) as f:
        md = f.read()
    assert md.startswith(markdown_table(result.rows)) and md.strip() == result.table
    assert "| grpo | 3 | 0, 1, 2 | 10 |" in md and "| mel | 4 | 0, 1, 2, 3 | 10 |" in md
    assert "**mel minus grpo**, paired by seed (seeds 0, 1, 2; last evaluation: step 10)" in md
    assert "| greedy | +20.0 |" in md and "left out: mel_s3 (seed 3 only in mel" in md
    assert "step time: +1.0 s / step (+50.0%) for mel over grpo" in md
    with open(result.json) as f:
        saved = json.load(f)
    assert set(saved) == {"runs", "benchmark", "arms", "paired"} and len(saved["runs"]) == 7
    assert saved["paired"][0]["greedy"]["two_level"] == pytest.approx(p["greedy"]["two_level"])
    assert png_size(result.png) == (1800, 1000)


def test_runs_group_into_arms_by_algorithm(seed_runs, tmp_path):
    # mel first on the command line: the GRPO arm is still A
    dirs = [*seed_runs["mel"][:3], *seed_runs["grpo"]]
    result = compare(dirs, output=str(tmp_path / "auto"))
    assert [a["arm"] for a in result.arms] == ["grpo", "grpo+mel"]
    (p,) = result.paired
    assert (p["a"], p["b"], p["seeds"], p["left_out"]) == ("grpo", "grpo+mel", [0, 1, 2], [])
    assert p["greedy"]["value"] == pytest.approx(0.2)
    # one run per algorithm: side by side as before, no arms
    single = compare([seed_runs["grpo"][0], seed_runs["mel"][0]], output=str(tmp_path / "one"))
    assert (single.arms, single.paired) == ([], [])
    with open(single.markdown) as f:
        assert f.read().strip() == markdown_table(single.rows)


def test_seed_twice_or_missing_is_left_out(seed_runs, tmp_path):
    mel0_again = synthetic_run(tmp_path / "again", "mel", 0)
    result = compare(arms={"grpo": seed_runs["grpo"][:2], "mel": [*seed_runs["mel"][:2],
                     mel0_again]}, output=str(tmp_path / "twice"))  # fmt: skip
    (p,) = result.paired
    assert p["seeds"] == [1]
    reasons = sorted(x["reason"] for x in p["left_out"])
    assert reasons == ["seed 0 only in grpo, not in mel", "seed 0 twice in mel"]
    assert p["greedy"]["value"] == pytest.approx(0.1) and p["greedy"]["two_level"] is None


def test_compare_arm_flag_end_to_end(seed_runs, tmp_path):
    prefix = str(tmp_path / "cli" / "grpo_vs_mel")
    out = meljax("compare", "--arm", "grpo=" + ",".join(seed_runs["grpo"]),
                 "--arm=mel=" + ",".join(seed_runs["mel"]), f"--output={prefix}")  # fmt: skip
    with open(prefix + ".md") as f:
        md = f.read()
    assert md.strip() in out and "## Arms" in md
    with open(prefix + ".json") as f:
        saved = json.load(f)
    assert [a["arm"] for a in saved["arms"]] == ["grpo", "mel"]
    assert saved["paired"][0]["greedy"]["value"] == pytest.approx(0.2)
    assert png_size(prefix + ".png") == (1800, 1000)
    for args, message in (
        (["--arm=grpo"], "expected NAME=DIR"),
        (["--arm=a=" + seed_runs["grpo"][0], "--arm=a=" + seed_runs["mel"][0]], "must differ"),
        ([seed_runs["grpo"][0], "--arm=a=" + seed_runs["mel"][0]], "not both"),
    ):
        proc = subprocess.run([sys.executable, "-m", "meljax", "compare", *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
