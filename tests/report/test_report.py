"""The run report: summary numbers (hand-computed), the PNG, examples, ``meljax report``."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest

from meljax.report import run_report as report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Four MEL steps written out of order, with nulls and missing keys:
# step 2 has no reward (null) and generated no analysis (ratio 0 logged, must not count);
# step 4 has no accuracy and no timings at all.
MEL_ROWS = [
    {
        "step": 1, "reward_mean": 0.25, "accuracy": 0.25, "pass_at_group": 0.5,
        "mel/generated": 4.0, "mel/kept": 1.0, "retention_ratio": 0.25,
        "train/mel_nll": 2.0, "train/mel_tokens": 40.0, "train/policy_loss": 0.01,
        "completion_len_mean": 10.0, "completion_len_max": 12.0, "truncation_rate": 0.5,
        "time/rollout": 4.0, "time/reward": 1.0, "time/meta_analysis": 2.0,
        "time/meta_replay": 1.0, "time/update": 1.0, "time/step": 10.0,
    },
    {
        "step": 2, "reward_mean": None, "accuracy": 0.5,
        "mel/generated": 0.0, "mel/kept": 0.0, "retention_ratio": 0.0,
        "train/mel_nll": 0.0, "train/mel_tokens": 0.0, "train/policy_loss": None,
        "time/rollout": 2.0, "time/reward": 0.5, "time/meta_analysis": 0.0,
        "time/meta_replay": 0.0, "time/update": 2.0, "time/step": 5.0,
    },
    {
        "step": 4, "reward_mean": 0.5, "accuracy": None,
        "mel/generated": 3.0, "mel/kept": 0.0, "retention_ratio": 0.0,
    },
    {
        "step": 3, "reward_mean": 0.75, "accuracy": 0.75,
        "mel/generated": 2.0, "mel/kept": 2.0, "retention_ratio": 1.0,
        "train/mel_nll": 1.5, "train/mel_tokens": 30.0, "train/policy_loss": -0.02,
        "time/rollout": 1.0, "time/reward": 0.25, "time/meta_analysis": 0.5,
        "time/meta_replay": 0.25, "time/update": 1.0, "time/step": 3.0,
    },
]  # fmt: skip

# A GRPO run: no mel/* keys, no retention ratio.
GRPO_ROWS = [
    {"step": 1, "reward_mean": 0.1, "accuracy": 0.1, "train/policy_loss": 0.0,
     "time/rollout": 3.0, "time/reward": 1.0, "time/update": 2.0, "time/step": 6.0},
    {"step": 2, "reward_mean": 0.3, "accuracy": 0.3, "train/policy_loss": 0.1,
     "time/rollout": 1.0, "time/reward": 0.5, "time/update": 0.5, "time/step": 2.0},
]  # fmt: skip


def write_jsonl(path, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def make_run(tmp_path, rows, name="run"):
    workdir = tmp_path / name
    write_jsonl(str(workdir / "metrics.jsonl"), rows)
    return str(workdir)


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG header; asserts the signature and IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_valid_figure(path) -> None:
    import matplotlib.image

    assert os.path.isfile(path)
    assert png_size(path) == (1300, 1100)  # figsize 13 x 11 inches at 100 dpi
    assert os.path.getsize(path) > 30_000  # six drawn panels, not a blank canvas
    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.05  # something was drawn


# -- summary numbers


def test_summary_of_mel_run_is_hand_computed(tmp_path):
    records = report.load_records(make_run(tmp_path, MEL_ROWS))
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # sorted
    s = report.summarize(records)
    assert (s.steps, s.first_step, s.last_step) == (4, 1, 4)
    # Rewards of steps 1, 3, 4 (step 2's is null): first 0.25, last 0.5, best 0.75 at step 3.
    assert (s.reward_first, s.reward_last, s.reward_best, s.best_step) == (0.25, 0.5, 0.75, 3)
    assert s.accuracy_start == 0.25
    # Retention over the steps that generated analyses: (0.25 + 1.0 + 0.0) / 3.
    assert s.retention_mean == pytest.approx(1.25 / 3)
    assert (s.kept_total, s.generated_total) == (3, 9)
    assert s.step_time_mean == pytest.approx((10 + 5 + 3) / 3)
    assert s.step_time_steady == pytest.approx((5 + 3) / 2)
    # Shares over steps 2 and 3 (the first timed step compiles): total 8 s.
    expected = {
        "rollout": 3.0 / 8,
        "reward": 0.75 / 8,
        "meta_analysis": 0.5 / 8,
        "meta_replay": 0.25 / 8,
        "update": 3.0 / 8,
        "other": 0.5 / 8,
    }
    assert s.phase_shares.keys() == expected.keys()
    for k, v in expected.items():
        assert s.phase_shares[k] == pytest.approx(v), k
    text = s.text()
    assert "0.250 / 0.500" in text
    assert "0.750 (step 3)" in text
    assert "3 / 9 (overall 0.333)" in text
    assert "0.417" in text
    assert "6.00 s (after the first: 4.00 s)" in text
    assert "37.5%  rollout" in text and "6.2%  other" in text


def test_summary_of_grpo_run_has_no_mel_numbers(tmp_path):
    s = report.summarize(report.load_records(make_run(tmp_path, GRPO_ROWS)))
    assert s.generated_total is None and s.kept_total is None and s.retention_mean is None
    assert (s.reward_first, s.reward_last, s.reward_best, s.best_step) == (0.1, 0.3, 0.3, 2)
    # Only step 2 counts for the shares: 1 / 2, 0.5 / 2, 0.5 / 2, no meta phases.
    assert s.phase_shares == pytest.approx({"rollout": 0.5, "reward": 0.25, "update": 0.25,
                                            "other": 0.0})  # fmt: skip
    assert "n/a (no MEL metrics: GRPO run?)" in s.text()


def test_single_step_summary(tmp_path):
    s = report.summarize(report.load_records(make_run(tmp_path, MEL_ROWS[:1])))
    assert s.steps == 1 and s.step_time_steady is None
    assert s.step_time_mean == 10.0
    assert s.phase_shares["rollout"] == pytest.approx(0.4)  # the only step is used
    assert s.phase_shares["other"] == pytest.approx(0.1)
    assert "after the first" not in s.text()


def test_all_null_metrics_give_na(tmp_path):
    s = report.summarize(
        report.load_records(make_run(tmp_path, [{"step": 5, "reward_mean": None}]))
    )
    assert s.reward_first is None and s.best_step is None and s.step_time_mean is None
    assert s.phase_shares == {}
    assert "n/a / n/a" in s.text()


def test_series_masks_steps_without_analyses():
    records = sorted(MEL_ROWS, key=lambda r: r["step"])
    ratio = report.retention_series(records)
    assert ratio[0] == 0.25 and math.isnan(ratio[1]) and ratio[2:] == [1.0, 0.0]
    nll = report.mel_nll_series(records)
    # Step 2 trained on no MEL token; step 4 has no NLL at all.
    assert nll[0] == 2.0 and math.isnan(nll[1]) and nll[2] == 1.5 and math.isnan(nll[3])
    assert report.retention_series([{"step": 1, "mel/retention_ratio": 0.5}]) == [0.5]


# -- reading errors


def test_missing_metrics_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no metrics file .*nowhere/metrics\.jsonl"):
        report.render_report(str(tmp_path / "nowhere"))


def test_empty_metrics_file_names_the_file(tmp_path):
    workdir = make_run(tmp_path, [])
    with pytest.raises(ValueError, match=r"metrics\.jsonl holds no records"):
        report.render_report(workdir)


def test_record_without_step_names_the_line(tmp_path):
    workdir = make_run(tmp_path, [{"step": 1}, {"reward_mean": 0.5}])
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: .*integer 'step'"):
        report.load_records(workdir)


def test_later_record_of_a_step_wins_and_torn_last_line_is_ignored(tmp_path):
    workdir = make_run(tmp_path, [{"step": 1, "reward_mean": 0.1}, {"step": 1, "reward_mean": 0.9}])
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2, "rew')  # a run killed mid-write
    records = report.load_records(workdir)
    assert records == [{"step": 1, "reward_mean": 0.9}]


# -- the figure


@pytest.mark.parametrize(
    "rows",
    [MEL_ROWS, GRPO_ROWS, MEL_ROWS[:1], [{"step": 1, "reward_mean": None}]],
    ids=["mel", "grpo", "single_step", "all_null"],
)
def test_render_report_writes_a_png(tmp_path, rows):
    workdir = make_run(tmp_path, rows)
    png, text = report.render_report(workdir)
    assert png == os.path.join(workdir, "report.png")
    assert_valid_figure(png)
    assert text == report.summarize(report.load_records(workdir)).text()


def test_render_report_custom_output_and_backend_untouched(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    out = str(tmp_path / "figs" / "curves.png")
    png, _ = report.render_report(make_run(tmp_path, MEL_ROWS), out)
    assert png == out
    assert_valid_figure(out)
    assert matplotlib.get_backend() == before


# -- meta-experience examples


def meta_rows():
    return [
        {"step": 1, "question_id": "q1", "question": "What is 1 plus 1?", "answer": "2",
         "text": "first kept analysis", "status": "kept", "kept": True, "replay_extracted": "2"},
        {"step": 1, "question_id": "q2", "question": "What is 2 plus 2?", "answer": "4",
         "text": "dropped", "status": "leak", "kept": False},
        {"step": 2, "question_id": "q3", "question": "What is 3 plus 3?", "answer": "6",
         "text": "second kept analysis " + "x" * 2000, "status": "kept", "kept": True,
         "replay_extracted": "6"},
    ]  # fmt: skip


def test_kept_examples_latest_first(tmp_path):
    write_jsonl(str(tmp_path / "meta_experiences.jsonl"), meta_rows())
    with open(tmp_path / "meta_experiences.jsonl", "a") as f:
        f.write('{"step": 3, "kep')  # torn last line
    records = report.read_meta_experiences(str(tmp_path))
    assert len(records) == 3
    assert [r["question_id"] for r in report.kept_examples(records, 5)] == ["q3", "q1"]
    assert [r["question_id"] for r in report.kept_examples(records, 1)] == ["q3"]
    assert report.kept_examples(records, 0) == []
    assert report.read_meta_experiences(str(tmp_path / "absent")) == []


def test_shorten_and_format_example():
    for n in (10, 41, 100):
        s = report.shorten("word " * 100, n)
        assert len(s) <= n and " ... " in s
    assert report.shorten("a\n b  c", 40) == "a b c"
    text = report.format_example(meta_rows()[2], max_chars=120)
    lines = text.splitlines()
    assert lines[0] == "step 2  question q3  status kept"
    assert "(replay answered 6)" in lines[2]
    assert lines[3].startswith("  analysis: second kept analysis")
    assert len(lines[3]) <= len("  analysis: ") + 120


# -- the command


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "meljax.cli", "report", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_prints_summary_figure_and_examples(tmp_path):
    workdir = make_run(tmp_path, MEL_ROWS)
    write_jsonl(os.path.join(workdir, "meta_experiences.jsonl"), meta_rows())
    out = run_cli(f"--workdir={workdir}", "--examples=1")
    assert out.returncode == 0, out.stderr
    assert "3 / 9 (overall 0.333)" in out.stdout
    assert f"figure: {os.path.join(workdir, 'report.png')}" in out.stdout
    assert "kept meta-experiences (1 of 2, most recent first):" in out.stdout
    assert "question q3" in out.stdout and "question q1" not in out.stdout
    assert_valid_figure(os.path.join(workdir, "report.png"))

    custom = str(tmp_path / "elsewhere.png")
    out = run_cli(f"--workdir={workdir}", f"--output={custom}", "--examples=0")
    assert out.returncode == 0, out.stderr
    assert f"figure: {custom}" in out.stdout and "meta-experience" not in out.stdout
    assert_valid_figure(custom)


def test_cli_without_meta_log_and_missing_run(tmp_path):
    workdir = make_run(tmp_path, GRPO_ROWS)
    out = run_cli(f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr
    assert "no meta-experience log" in out.stdout

    missing = str(tmp_path / "missing")
    out = run_cli(f"--workdir={missing}")
    assert out.returncode == 2
    assert f"meljax report: error: no metrics file {missing}/metrics.jsonl" in out.stderr
