"""Tests of meljax.rewards: extraction, math-verify edge cases, adversarial input, worker faults.

Worker processes start slowly, so one verifier is shared by the module (`pool` fixture) and a
second one, with an injected faulty `score_fn`, serves the fault-tolerance test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from meljax.rewards import (
    REASONS,
    RewardConfig,
    RewardResult,
    Verifier,
    close_shared_verifier,
    extract_answer,
    last_boxed,
    last_boxed_span,
    last_number,
    math_reward,
    run_guarded,
    score_batch,
    score_one,
)
from meljax.rewards.extract import clip_tail, nesting_depth

# Generous limit for well-formed items (the test machine may be heavily loaded); the
# adversarial test uses the short one so that its timeouts stay cheap.
TIMEOUT_S = 10.0
SHORT_TIMEOUT_S = 2.0
KILL_GRACE_S = 1.0


@pytest.fixture(scope="module")
def pool():
    with Verifier(RewardConfig(timeout_s=TIMEOUT_S, num_workers=2), kill_grace_s=KILL_GRACE_S) as p:
        yield p


# --- extraction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\fbox{7}", "7"),
        ("\\boxed {8}", "8"),
        ("\\boxed{3", None),  # unclosed: truncated completion
        ("\\boxed{1} and \\boxed{2", None),  # the last box is the one that counts
        ("\\boxed{}", None),
        ("no box at all 5", None),
        ("\\boxed{\\boxed{9}}", "9"),
        # The brace-less argument LaTeX also accepts (MATH solutions use it): to the next
        # space, `$` or unmatched `}`, brace groups kept whole.
        ("space form \\boxed 7$ end", "7"),
        ("$\\boxed 2$.", "2"),
        ("\\boxed 42", "42"),
        ("\\boxed5", "5"),
        ("\\boxed x^{2}$", "x^{2}"),
        ("{\\boxed 5}", "5"),
        ("\\boxed \\pi$", "\\pi"),
        ("\\boxed $5$", None),  # no argument before the math delimiter
        ("\\boxed\n{7}", "7"),
        ("\\boxed{ 5 }", "5"),
        ("\\boxed{5} then \\fboxsep", "5"),  # \fboxsep is a length, not a box
        ("\\boxedx{3}", None),  # another control word
        ("\\boxed{5} \\boxed", None),  # the last box (cut off) is the answer, not an earlier one
        (
            "nested \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
        ),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 5 = 8.", "8"),
        ("The answer is 1,000", "1000"),
        ("It costs 1,234,567.5 dollars", "1234567.5"),
        ("x equals -3.5", "-3.5"),
        ("(-5)", "-5"),
        ("3-5", "5"),  # binary minus, not a negative number
        ("she ate 3/4 of it", "3/4"),
        ("about .5 of them", ".5"),
        ("values 1,2,3", "3"),  # not a thousands group
        ("version x2", None),  # glued to a word
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_last_boxed_span_points_at_the_content():
    text = "a \\boxed{1} b \\boxed{x^{2}} c"
    start, end = last_boxed_span(text)
    assert text[start:end] == "x^{2}"
    assert text[:start].endswith("\\boxed{") and text[end:] == "} c"
    assert last_boxed_span("\\boxed{x") is None


def test_extract_answer_modes():
    text = "We get \\boxed{7}, and 9 is a distractor"
    assert extract_answer(text, "boxed") == "7"
    assert extract_answer(text, "last_number") == "9"
    assert extract_answer(text, "boxed_or_last_number") == "7"
    assert extract_answer("the total is 12", "boxed") is None
    assert extract_answer("the total is 12", "boxed_or_last_number") == "12"
    with pytest.raises(ValueError, match="unknown extraction mode"):
        extract_answer(text, "first_number")


def test_clip_tail_and_nesting_depth():
    assert clip_tail("abcdef", 3) == "def"
    assert clip_tail("abc", 3) == "abc"
    assert nesting_depth("\\frac{a}{b^{2}}") == 2
    assert nesting_depth("\\left(\\{1\\}\\right)") == 2
    assert nesting_depth("{" * 50 + "}" * 50) == 50
    assert nesting_depth("x") == 0


def test_reward_config_validation():
    with pytest.raises(ValueError, match="mode"):
        RewardConfig(mode="boxxed")
    with pytest.raises(ValueError, match="timeout_s"):
        RewardConfig(timeout_s=0)


# --- scoring edge cases (real math-verify behaviour, through the worker pool) -----------

EDGE_CASES = [
    # (completion, gold, mode, score, reason)
    ("\\boxed{\\frac{1}{2}}", "0.5", "boxed", 1.0, "correct"),
    ("\\boxed{0.5}", "\\frac{1}{2}", "boxed", 1.0, "correct"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", "boxed", 1.0, "correct"),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", "boxed", 1.0, "correct"),
    ("\\boxed{\\frac{1}{3}}", "0.5", "boxed", 0.0, "mismatch"),
    # Percent: math-verify accepts the number with or without the % sign, and 0.5 for 50%.
    ("\\boxed{50\\%}", "50", "boxed", 1.0, "correct"),
    ("\\boxed{50}", "50\\%", "boxed", 1.0, "correct"),
    ("\\boxed{0.5}", "50\\%", "boxed", 1.0, "correct"),
    ("\\boxed{5 \\text{ cm}}", "5", "boxed", 1.0, "correct"),
    ("\\boxed{5}", "5\\text{ cm}", "boxed", 1.0, "correct"),
    ("\\boxed{30^\\circ}", "30", "boxed", 1.0, "correct"),
    ("\\boxed{30}", "30^\\circ", "boxed", 1.0, "correct"),
    ("\\boxed{[1,2)}", "[1,2)", "boxed", 1.0, "correct"),
    ("\\boxed{(1,2]}", "[1,2)", "boxed", 0.0, "mismatch"),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", "boxed", 1.0, "correct"),
    ("\\boxed{x=3}", "3", "boxed", 1.0, "correct"),
    ("\\boxed{3}", "x=3", "boxed", 1.0, "correct"),
    ("\\boxed{y=3}", "x=3", "boxed", 0.0, "mismatch"),  # strict: the variable matters
    ("\\boxed{2} so finally \\boxed{3}", "3", "boxed", 1.0, "correct"),
    ("\\boxed{3} hmm, no: \\boxed{2}", "3", "boxed", 0.0, "mismatch"),
    ("\\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^2}", "boxed", 1.0, "correct"),
    ("\\boxed{3", "3", "boxed", 0.0, "no_answer"),
    ("The answer is 3.", "3", "boxed", 0.0, "no_answer"),
    ("\\boxed{25}", "025", "boxed", 1.0, "correct"),  # AIME gold with leading zeros
    ("\\boxed{025}", "25", "boxed", 1.0, "correct"),
    ("\\boxed{$5$}", "5", "boxed", 1.0, "correct"),
    # Escaped dollars are currency signs, not math delimiters (MATH-500 has such golds).
    ("\\boxed{\\$36}", "\\$36", "boxed", 1.0, "correct"),
    ("\\boxed{32348}", "\\$32,\\!348", "boxed", 1.0, "correct"),
    ("\\boxed{5}", "$5$", "boxed", 1.0, "correct"),  # a gold with delimiters is not re-boxed
    ("\\fbox{4}", "4", "boxed", 1.0, "correct"),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", "boxed", 1.0, "correct"),
    ("\\boxed{\\text{(D)}}", "\\text{(C)}", "boxed", 0.0, "mismatch"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", "boxed", 1.0, "correct"),
    # Tuples. math-verify 0.9 reads "(1,2)" as the open interval and "(2,1)" (an empty
    # interval) as a tuple, so reordered pairs do NOT match; parenthesised triples are
    # ordered tuples. Bare comma lists "1,2" are parsed as sets, so their order is free.
    ("\\boxed{(1,2)}", "(1,2)", "boxed", 1.0, "correct"),
    ("\\boxed{(2,1)}", "(1,2)", "boxed", 0.0, "mismatch"),
    ("\\boxed{(3,2,1)}", "(1,2,3)", "boxed", 0.0, "mismatch"),
    ("\\boxed{(1,2,3)}", "(1,2,3)", "boxed", 1.0, "correct"),
    ("\\boxed{2,1}", "1,2", "boxed", 1.0, "correct"),
    # last_number mode (the CPU demo model rarely writes \boxed{}).
    ("3 + 5 = 8.", "8", "last_number", 1.0, "correct"),
    ("The answer is 1,000", "1000", "last_number", 1.0, "correct"),
    ("So x = -3.5", "-\\frac{7}{2}", "last_number", 1.0, "correct"),
    ("She ate 3/4 of the cake", "\\frac{3}{4}", "last_number", 1.0, "correct"),
    ("I do not know.", "8", "last_number", 0.0, "no_answer"),
    ("3 + 5 = 9", "8", "last_number", 0.0, "mismatch"),
    ("\\boxed{7} and 9 more", "7", "boxed_or_last_number", 1.0, "correct"),
    ("the total is 12", "12", "boxed_or_last_number", 1.0, "correct"),
]


@pytest.mark.parametrize("completion, gold, mode, score, reason", EDGE_CASES)
def test_edge_cases_in_pool(pool, completion, gold, mode, score, reason):
    (result,) = pool.score(
        [completion], [gold], config=RewardConfig(mode=mode, timeout_s=TIMEOUT_S)
    )
    assert (result.score, result.reason) == (score, reason), result


def test_extracted_field_is_the_clean_answer(pool):
    results = pool.score(
        ["\\boxed{\\frac{a}{b^{2}}}", "The answer is 1,000", "no"],
        ["\\frac{a}{b^2}", "1000", "1"],
        config=RewardConfig(mode="boxed_or_last_number", timeout_s=TIMEOUT_S),
    )
    assert [r.extracted for r in results] == ["\\frac{a}{b^{2}}", "1000", None]


def test_pool_matches_in_process_and_keeps_order(pool):
    completions = [f"work... \\boxed{{{i}}}" for i in range(12)]
    answers = [str(i if i % 3 else i + 1) for i in range(12)]  # every third one is wrong
    config = RewardConfig()
    got = pool.score(completions, answers, config=config)
    with Verifier(RewardConfig(num_workers=0)) as in_process:
        want = in_process.score(completions, answers, config=config)
    assert got == want
    assert [r.score for r in got] == [0.0 if i % 3 == 0 else 1.0 for i in range(12)]


# --- adversarial input -------------------------------------------------------------------


def test_adversarial_inputs_return_in_time_and_score_zero(pool, tmp_path):
    marker = tmp_path / "pwned"
    cases = [
        ("x" * 1_000_000 + " \\boxed{5}", "5", 1.0, {"correct"}),  # 1 MB, answer at the end
        # The 1 MB suffix pushes this box out of the 20k-character window: no answer.
        ("\\boxed{5}" + "x" * 1_000_000, "5", 0.0, {"no_answer"}),
        ("{" * 5000 + "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1", 0.0, {"parse_error"}),
        ("\\boxed{" * 100_000, "1", 0.0, {"no_answer"}),
        ("\\boxed{10^{10^{10^{10}}}}", "10", 0.0, {"timeout", "mismatch"}),
        (f"\\boxed{{__import__('os').system('touch {marker}')}}", "0", 0.0, {"parse_error"}),
        # Read as a product of symbols; its comparison takes ~0.8 s on a loaded core.
        ("\\boxed{eval('1+1')}", "2", 0.0, {"parse_error", "mismatch", "timeout"}),
        ("\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "}", "1", 0.0, {"parse_error"}),
    ]
    completions, answers, _, _ = zip(*cases, strict=True)
    start = time.monotonic()
    results = pool.score(
        list(completions), list(answers), config=RewardConfig(timeout_s=SHORT_TIMEOUT_S)
    )
    elapsed = time.monotonic() - start
    # Two workers, at most one item can use the whole time limit plus the kill grace.
    assert elapsed < 2 * (SHORT_TIMEOUT_S + KILL_GRACE_S) + 3.0, elapsed
    for (completion, _, score, reasons), result in zip(cases, results, strict=True):
        assert result.score == score and result.reason in reasons, (completion[:60], result)
    assert not marker.exists()
    # Extracted answers are clipped to max_answer_chars.
    assert all(r.extracted is None or len(r.extracted) <= 1000 for r in results)


def test_in_process_timeout_and_restores_callers_timer():
    def sleepy(completion, answer, config):
        time.sleep(10)
        return RewardResult(1.0, "correct", "x")

    signal.setitimer(signal.ITIMER_REAL, 100.0)
    previous = signal.getsignal(signal.SIGALRM)
    try:
        start = time.monotonic()
        result = run_guarded(sleepy, "a", "b", RewardConfig(timeout_s=0.2))
        assert time.monotonic() - start < 2.0
        assert result == RewardResult(0.0, "timeout", None)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90.0 < remaining <= 100.0  # the caller's timer is armed again
        assert signal.getsignal(signal.SIGALRM) is previous
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_run_guarded_turns_errors_and_bad_results_into_crash():
    def boom(completion, answer, config):
        raise RuntimeError("bug")

    def bad(completion, answer, config):
        return 1.0

    assert run_guarded(boom, "a", "b", RewardConfig()).reason == "crash"
    assert run_guarded(bad, "a", "b", RewardConfig()).reason == "crash"


# --- fault tolerance with an injected score_fn ------------------------------------------
# Module-level so that spawned workers can import it by reference. It only reacts to magic
# strings because it is passed explicitly to a test pool; production pools use score_one.


def faulty_score_fn(completion: str, answer: str, config: RewardConfig) -> RewardResult:
    if completion == "HANG":  # interruptible: the in-worker timer stops it
        time.sleep(1000)
    if completion == "HANG_IGNORING_SIGNALS":  # like C code: only the parent's kill helps
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(1000)
    if completion == "CRASH":
        os._exit(3)
    if completion == "RAISE":
        raise RuntimeError("bug in score_fn")
    return score_one(completion, answer, config)


def test_hung_and_crashed_items_score_zero_and_pool_recovers():
    config = RewardConfig(timeout_s=1.0, num_workers=2)
    with Verifier(config, score_fn=faulty_score_fn, kill_grace_s=0.5) as faulty:
        completions = [
            "\\boxed{1}",
            "HANG",
            "HANG_IGNORING_SIGNALS",
            "\\boxed{2}",
            "CRASH",
            "RAISE",
            "\\boxed{3}",
        ]
        answers = ["1", "0", "0", "2", "0", "0", "4"]
        start = time.monotonic()
        results = faulty.score(completions, answers)
        # Returns at all (the hung items sleep 1000 s); generous for a loaded machine.
        assert time.monotonic() - start < 120.0
        assert [(r.score, r.reason) for r in results] == [
            (1.0, "correct"),
            (0.0, "timeout"),
            (0.0, "timeout"),
            (1.0, "correct"),
            (0.0, "crash"),
            (0.0, "crash"),
            (0.0, "mismatch"),
        ]
        # The signal-ignoring hang was killed and the crashed worker replaced; the plain
        # hang and the exception were handled inside their worker.
        assert faulty.restarts == 2
        again = faulty.score(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], ["1", "2", "5"])
        assert [r.score for r in again] == [1.0, 1.0, 0.0]
    with pytest.raises(RuntimeError, match="after close"):
        faulty.score(["\\boxed{1}"], ["1"])


def test_worker_that_cannot_start_raises_and_closes_the_pool(tmp_path, monkeypatch):
    # A score_fn whose module is gone by the time the worker imports it.
    module = tmp_path / "vanishing_scorer.py"
    module.write_text("def score(completion, answer, config):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from vanishing_scorer import score

    module.unlink()
    pool = Verifier(RewardConfig(num_workers=1), score_fn=score)
    with pytest.raises(RuntimeError, match="before it was ready"):
        pool.score(["\\boxed{1}"], ["1"])
    with pytest.raises(RuntimeError, match="after close"):
        pool.score(["\\boxed{1}"], ["1"])


# --- convenience API ---------------------------------------------------------------------


def test_math_reward_and_score_batch():
    completions = ["\\boxed{4}", "\\boxed{5}", "no answer", "it is 6"]
    answers = ["4", 4, "1", 6]  # ints are accepted as ground truth
    assert math_reward(completions, answers, num_workers=0) == [1.0, 0.0, 0.0, 0.0]
    assert math_reward(completions, answers, mode="boxed_or_last_number", num_workers=0) == [
        1.0,
        0.0,
        0.0,
        1.0,
    ]
    try:
        results = score_batch(completions, answers, num_workers=1)
    finally:
        close_shared_verifier()
    assert [r.reason for r in results] == ["correct", "mismatch", "no_answer", "no_answer"]
    assert all(r.reason in REASONS for r in results)


def test_batch_validation_names_the_culprit():
    with pytest.raises(ValueError, match="2 != 1"):
        math_reward(["a", "b"], ["1"], num_workers=0)
    with pytest.raises(TypeError, match=r"answers\[1\]"):
        math_reward(["a", "b"], ["1", None], num_workers=0)
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        math_reward([b"bytes"], ["1"], num_workers=0)
    assert math_reward([], [], num_workers=0) == []


def test_math_reward_from_a_plain_script_without_main_guard(tmp_path):
    # Workers are fresh interpreters (python -m meljax.rewards.worker): the script's top-level
    # code is not run again in them, so no `if __name__ == "__main__":` is needed.
    script = tmp_path / "score.py"
    script.write_text(
        "from meljax.rewards import math_reward\n"
        "print('scored', math_reward(['so \\\\boxed{4}', '\\\\boxed{5}'], ['4', '4'], "
        "num_workers=2))\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("scored") == 1  # the script ran once, not once per worker
    assert "scored [1.0, 0.0]" in proc.stdout


def test_functions_from_main_are_refused_with_a_clear_message():
    def local(completion, answer, config):
        return RewardResult(1.0, "correct", None)

    with pytest.raises(ValueError, match="module-level function of an importable module"):
        Verifier(RewardConfig(num_workers=1), score_fn=local)


@pytest.mark.parametrize("workers", [0, 1])
def test_hang_hook_times_out_the_listed_rows(monkeypatch, workers):
    monkeypatch.setenv("MELJAX_TEST_VERIFIER_HANG_ROWS", "1,3")
    config = RewardConfig(timeout_s=0.3, num_workers=workers)
    with Verifier(config, kill_grace_s=0.5) as verifier:
        results = verifier.score([f"\\boxed{{{i}}}" for i in range(5)], [str(i) for i in range(5)])
    assert [r.reason for r in results] == ["correct", "timeout", "correct", "timeout", "correct"]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_batch_of_hanging_answers_costs_about_one_timeout(monkeypatch, workers):
    """Six answers that hang in a batch of eight: the first gets the full limit, the five
    after it the shorter ``timeout_after_first_s`` (was six full timeouts); every hanging
    answer scores 0 and is counted, the others score as always, and the next batch starts
    with the full limit again. Checked on the limit each answer was granted, not on a clock."""
    from meljax.rewards import pool

    monkeypatch.setenv("MELJAX_TEST_VERIFIER_HANG_ROWS", "0,1,2,4,5,6")
    granted: list[tuple[str, float]] = []  # (answer, its time limit in s), in start order
    if workers == 0:
        run_guarded = pool.run_guarded

        def spy(fn, text, gold, config):
            granted.append((text, config.timeout_s))
            return run_guarded(fn, text, gold, config)

        monkeypatch.setattr(pool, "run_guarded", spy)
    else:
        dispatch = pool.Verifier._dispatch

        def spy(self, pending, texts, gold, config):
            before = list(pending)
            dispatch(self, pending, texts, gold, config)
            sent = before[: len(before) - len(pending)]
            granted.extend((texts[i], config.timeout_s) for i in sent)

        monkeypatch.setattr(pool.Verifier, "_dispatch", spy)
    config = RewardConfig(timeout_s=2.0, timeout_after_first_s=0.2, num_workers=workers)
    completions = [f"\\boxed{{{i}}}" for i in range(8)]
    with Verifier(config, kill_grace_s=1.0) as verifier:
        results = verifier.score(completions, [str(i) for i in range(8)])
        assert verifier.timeouts == 6
        first = dict(granted)
        granted.clear()
        # The next batch starts with the full limit again.
        assert [r.reason for r in verifier.score(completions[:1], ["0"])] == ["timeout"]
        assert granted == [(completions[0], 2.0)]
    reasons = [r.reason for r in results]
    assert reasons == ["timeout"] * 3 + ["correct"] + ["timeout"] * 3 + ["correct"]
    assert all(r.score == 0.0 for r in results if r.reason == "timeout")
    hanging = [first[completions[i]] for i in (0, 1, 2, 4, 5, 6)]
    assert hanging == [2.0] + [0.2] * 5  # one full timeout, five short ones


def test_batch_limit_is_the_one_rule():
    from meljax.rewards.guard import batch_limit

    config = RewardConfig(timeout_s=5.0, timeout_after_first_s=0.5)
    assert batch_limit(config, False) is config
    assert batch_limit(config, True).timeout_s == 0.5
    short = RewardConfig(timeout_s=0.3, timeout_after_first_s=0.5)
    assert batch_limit(short, True) is short  # never longer than timeout_s
