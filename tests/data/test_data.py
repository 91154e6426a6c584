"""Tests for meljax.data: records/readers/presets, procedural source, array_record storage,
grain pipelines and prompt formatting."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meljax.data import (
    DEFAULT_INSTRUCTION,
    DEMO_INSTRUCTION,
    PRESETS,
    ArithmeticProblems,
    BadRowError,
    FieldMap,
    Problem,
    format_prompt,
    format_prompts,
    infer_preset,
    load_problems,
    make_problem_iterator,
)
from meljax.data.answers import answer_from_boxed
from meljax.data.fieldpath import get_path, parse_path
from meljax.rewards import last_boxed

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
# The project's data folder next to the repository (or MELJAX_SHARED_DATA); tests skip without it.
SHARED_DATA = Path(
    os.environ.get("MELJAX_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")
)


# ---------------------------------------------------------------------------------------
# Field paths and the boxed-answer helper.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("problem", ("problem",)),
        ("reward_model.ground_truth", ("reward_model", "ground_truth")),
        ('prompt[0]["content"]', ("prompt", 0, "content")),
        ("prompt[0].content", ("prompt", 0, "content")),
        ("prompt[-1]['content']", ("prompt", -1, "content")),
        ("final_answer[0]", ("final_answer", 0)),
        ("a[1][2].b", ("a", 1, 2, "b")),
    ],
)
def test_parse_path(path, parts):
    assert parse_path(path) == parts


@pytest.mark.parametrize("bad", ["", "a..b", "a.", ".a", "a[x]", "a.[0]", "a[0"])
def test_parse_path_rejects_malformed(bad):
    with pytest.raises(ValueError, match="Malformed field path"):
        parse_path(bad)


def test_get_path_walks_nested_rows_and_names_missing_parts():
    row = {"prompt": [{"role": "user", "content": "Q?"}], "rm": {"gt": 7}}
    assert get_path(row, 'prompt[0]["content"]') == "Q?"
    assert get_path(row, "rm.gt") == 7
    with pytest.raises(LookupError, match=r"prompt\[1\] is out of range"):
        get_path(row, "prompt[1].content")
    with pytest.raises(LookupError, match=r"no field 'rm.answer'"):
        get_path(row, "rm.answer")
    with pytest.raises(LookupError, match="rm is not a list"):
        get_path(row, "rm[0]")


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("so $\\boxed{5}$.", "5"),
        ("space form \\boxed 7$ end", "7"),
        ("\\boxed {8}", "8"),
        ("first \\boxed{1} then \\boxed{ \\frac{1}{2} }", "\\frac{1}{2}"),
    ],
)
def test_answer_from_boxed_reads_the_box_as_the_verifier_does(solution, expected):
    # The ground truth of MATH / Minerva rows comes from the verifier's extractor.
    assert answer_from_boxed(solution) == expected == last_boxed(solution)


@pytest.mark.parametrize(
    "solution", ["no box at all", "unbalanced \\boxed{\\frac{1}{2}", "\\boxed{}"]
)
def test_answer_from_boxed_rejects_a_missing_or_empty_box(solution):
    with pytest.raises(ValueError, match="no complete, non-empty"):
        answer_from_boxed(solution)


# ---------------------------------------------------------------------------------------
# Presets on fixtures that mimic each layout.
# ---------------------------------------------------------------------------------------


def _triples(result):
    return [(p.id, p.question, p.answer) for p in result]


def test_math500_preset_reads_problem_and_answer_and_skips_blank_lines():
    result = load_problems(str(FIXTURES / "math500" / "test.jsonl"))
    assert result.preset == "math500"
    assert _triples(result) == [
        ("math500/test/prealgebra/1.json", "Compute $\\frac{3}{4} + \\frac{1}{4}$.", "1"),
        (
            "math500/test/precalculus/2.json",
            "Write $(1,2)$ in polar form.",
            "\\left( \\sqrt{5}, 1 \\right)",
        ),
    ]
    # Fields other than the question/answer are kept as metadata.
    assert result[0].extra["subject"] == "Prealgebra"
    assert result[0].extra["level"] == 1
    assert "problem" not in result[0].extra and "answer" not in result[0].extra


def test_aime24_answers_lose_leading_zeros():
    result = load_problems(str(FIXTURES / "aime24"))  # a folder: uses the default file
    assert [p.answer for p in result] == ["204", "25", "7"]
    assert [p.id for p in result] == ["aime24/60", "aime24/61", "aime24/62"]
    assert result[1].extra["url"] == "https://example.org/2"


def test_aime25_drops_the_trailing_instruction_line_only():
    result = load_problems(str(FIXTURES / "aime25" / "aime25.jsonl"))
    assert _triples(result) == [
        ("aime25/0", "Find the sum of all bases $b>9$ with a property.", "70"),
        ("aime25/1", "A two-line problem.\nIt continues here.", "588"),
    ]


def test_amc23_float_answers_become_integer_strings():
    result = load_problems(str(FIXTURES / "amc23" / "test.jsonl"))
    assert [p.answer for p in result] == ["27", "-1", "3159"]


def test_olympiadbench_strips_dollars_from_final_answer():
    result = load_problems(str(FIXTURES / "olympiadbench" / "test.jsonl"))
    assert [p.answer for p in result] == ["2", "\\frac{1}{2 n+2}", "69,84"]
    assert [p.id for p in result] == [
        "olympiadbench/1606",
        "olympiadbench/1607",
        "olympiadbench/1608",
    ]
    assert result[2].extra["is_multiple_answer"] is True
    assert result[2].extra["error"] == "1e-1"


def test_minerva_and_math_test_take_last_boxed_of_solution():
    minerva = load_problems(str(FIXTURES / "minerva_math" / "test.jsonl"))
    assert [p.answer for p in minerva] == ["1.6", "\\frac{1}{4 \\times 10^{3}}"]
    assert minerva[0].extra["type"] == "Astronomy"
    math_test = load_problems(str(FIXTURES / "math_test" / "test.jsonl"))
    assert [p.answer for p in math_test] == ["2", "\\{1, 2\\}"]
    assert math_test[1].extra["level"] == "Level 4"


def test_gsm8k_final_answer_after_hashes_without_commas():
    result = load_problems(str(FIXTURES / "gsm8k" / "test.jsonl"))
    assert _triples(result) == [
        ("gsm8k/0", "How many eggs are sold?", "9"),
        ("gsm8k/1", "How many dollars in total?", "1200"),
    ]


def test_math_train_json_list_filters_null_and_empty_answers():
    result = load_problems(str(FIXTURES / "math_train" / "math.json"))
    assert result.preset == "math_train"  # folder name wins over the "math" file stem
    assert result.num_filtered == 2
    assert result.num_skipped == 0
    # Ids keep the original row index, so the filtered rows leave gaps.
    assert _triples(result) == [
        ("math_train/0", "Find $a+b$.", "0"),
        ("math_train/2", "Largest band size?", "98"),
        ("math_train/4", "Simplify $\\sqrt{8}$.", "2\\sqrt{2}"),
    ]
    assert result[0].extra == {"difficulty": 5.0, "type": "Algebra"}


def _write_dapo_parquet(path: Path) -> None:
    rows = [
        {
            "data_source": "DAPO-17k",
            "prompt": [{"content": f"Problem number {i}?", "role": "user"}],
            "ability": "math",
            "reward_model": {"ground_truth": str(10 * i + 4), "style": "rule"},
            "extra_info": {"answer": "", "index": i, "split": "train"},
        }
        for i in range(5)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_dapo_parquet_nested_fields(tmp_path):
    folder = tmp_path / "dapo_math_17k"
    folder.mkdir()
    _write_dapo_parquet(folder / "dapo_math_17k.parquet")
    result = load_problems(str(folder))
    assert result.preset == "dapo_math_17k"
    assert _triples(result) == [
        (f"dapo_math_17k/{i}", f"Problem number {i}?", str(10 * i + 4)) for i in range(5)
    ]
    assert result[3].extra == {"data_source": "DAPO-17k", "ability": "math"}
    assert [p.id for p in load_problems(str(folder), limit=2)] == [
        "dapo_math_17k/0",
        "dapo_math_17k/1",
    ]


@pytest.mark.parametrize(
    ("path", "preset"),
    [
        ("/x/math500/test.jsonl", "math500"),
        ("/x/math_train/math.json", "math_train"),
        ("/x/math/test.jsonl", "math"),
        ("/x/gsm8k/train.jsonl", "gsm8k"),
        ("/x/gsm8k", "gsm8k"),
        ("/elsewhere/aime25.jsonl", "aime25"),
        ("gs://bucket/data/olympiadbench/test.jsonl", "olympiadbench"),
        ("/x/unknown/test.jsonl", None),
    ],
)
def test_infer_preset(path, preset):
    assert infer_preset(path) == preset


def test_unknown_layout_names_the_missing_field(tmp_path):
    path = tmp_path / "mystery.jsonl"
    path.write_text('{"q": "x", "answer": "1"}\n')
    with pytest.raises(BadRowError, match=r"row 0: no field 'question' \(available: answer, q\)"):
        load_problems(str(path))
    path.write_text('{"question": "x", "a": "1"}\n')
    with pytest.raises(BadRowError, match="no field 'answer'.*rows need 'question' and 'answer'"):
        load_problems(str(path))
    with pytest.raises(ValueError, match="Unknown preset 'nope'"):
        load_problems(str(path), "nope")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_question_answer_file_loads_without_a_preset(tmp_path, fmt):
    rows = [
        {"id": "a1", "question": " What is 2+2? ", "answer": 4, "level": 1},
        {"id": "a2", "question": "What is 3+5?", "answer": "8", "level": 2},
    ]
    path = tmp_path / f"bench.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows[0]["answer"] = "4"  # one type per parquet column
        pq.write_table(pa.Table.from_pylist(rows), path)
    result = load_problems(str(path))
    assert result.preset is None
    assert _triples(result) == [("a1", "What is 2+2?", "4"), ("a2", "What is 3+5?", "8")]
    assert result[1].extra["level"] == 2
    # without ids, the row index is the id
    path = tmp_path / "no_ids.jsonl"
    path.write_text('{"question": "Q0", "answer": "0"}\n{"question": "Q1", "answer": "1"}\n')
    assert _triples(load_problems(str(path))) == [("0", "Q0", "0"), ("1", "Q1", "1")]


def test_custom_fields_with_nested_paths_and_answer_transform(tmp_path):
    path = tmp_path / "custom.json"
    rows = [
        {"meta": {"uid": "a"}, "msgs": [{"text": "Q1"}, {"text": "ignored"}], "gt": {"v": [" x "]}},
        {"meta": {"uid": "b"}, "msgs": [{"text": "Q2"}], "gt": {"v": ["y"]}},
    ]
    path.write_text(json.dumps(rows))
    fields = FieldMap(
        question_field="msgs[0].text",
        answer_field="gt.v[0]",
        id_field="meta.uid",
        answer_transform=lambda v: v.strip().upper(),
        extra_fields=(),
    )
    assert _triples(load_problems(str(path), fields=fields)) == [
        ("a", "Q1", "X"),
        ("b", "Q2", "Y"),
    ]
    # A dict overrides a preset's attributes; here gsm8k's question field.
    other = tmp_path / "gsm_like.jsonl"
    other.write_text('{"prompt": "Q?", "answer": "work\\n#### 12,345"}\n')
    result = load_problems(str(other), "gsm8k", fields={"question_field": "prompt"})
    assert _triples(result) == [("gsm8k/0", "Q?", "12345")]
    with pytest.raises(ValueError, match="Bad fields= override"):
        load_problems(str(other), "gsm8k", fields={"no_such_attr": 1})


def test_bad_rows_error_names_file_and_row():
    path = str(FIXTURES / "bad_rows.jsonl")
    with pytest.raises(BadRowError, match=r"bad_rows\.jsonl: row 1: .*no field 'answer'"):
        load_problems(path, fields={})


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"question": 5, "answer": "2"}', r"row 0: question 'question' is a int"),
        ("not json", r"row 0: invalid JSON"),
        ('{"question": "   ", "answer": "4"}', r"row 0: question 'question' is empty"),
        ('{"question": "q", "answer": null}', r"row 0: answer 'answer'"),
        ('{"question": "q", "answer": ["1"]}', r"row 0: answer 'answer'"),
        ('["q", "a"]', r"row 0: row is a list"),
    ],
)
def test_each_kind_of_bad_row_is_reported(tmp_path, row, message):
    path = tmp_path / "one.jsonl"
    path.write_text(row + "\n")
    with pytest.raises(BadRowError, match=message):
        load_problems(str(path), fields={})


def test_bad_rows_skip_mode_counts_and_reports_them():
    result = load_problems(str(FIXTURES / "bad_rows.jsonl"), fields={}, on_bad_row="skip")
    assert _triples(result) == [("0", "Good one.", "1"), ("4", "Also good.", "3")]
    assert result.num_skipped == 4
    assert [b.index for b in result.bad_rows] == [1, 2, 3, 5]
    assert "invalid JSON" in result.bad_rows[2].reason


def _with_bad_byte(tmp_path, name: str) -> str:
    """A file whose second row holds the byte 0xff (not UTF-8) in its question."""
    if name.endswith(".jsonl"):
        rows = [b'{"question": "1+1", "answer": "2"}', b'{"question": "caf\xff", "answer": "3"}']
        data = b"\n".join([*rows, b'{"question": "2+2", "answer": "4"}']) + b"\n"
    else:
        data = b'[{"question": "1+1", "answer": "2"}, {"question": "caf\xff", "answer": "3"}]'
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("name", "where"),
    [("bad.jsonl", "byte 0xff at line 2, column 18"), ("bad.json", "byte 0xff")],
)
def test_bytes_that_are_not_utf8_name_file_and_row_and_obey_on_bad_row(tmp_path, name, where):
    """A non-UTF-8 byte was a bare ``UnicodeDecodeError`` (no file, no row) and
    ``on_bad_row="skip"`` did not skip it."""
    path = _with_bad_byte(tmp_path, name)
    with pytest.raises(BadRowError, match=rf"{re.escape(path)}: row 1: not valid UTF-8: {where}"):
        load_problems(path)
    result = load_problems(path, on_bad_row="skip")
    assert [p.question for p in result][0] == "1+1" and len(result) == len(result.problems)
    assert result.num_skipped == 1 and result.bad_rows[0].index == 1
    assert "not valid UTF-8" in result.bad_rows[0].reason


def test_eval_with_a_non_utf8_benchmark_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    path = _with_bad_byte(tmp_path, "bad.jsonl")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "meljax", "eval", "--config=tiny"]
    proc = subprocess.run(
        [*cmd, f"--config.eval.benchmarks={path}"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"meljax eval: error: {path}: row 1: not valid UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_aime_rejects_non_integer_answers(tmp_path):
    path = tmp_path / "aime24" / "test.jsonl"
    path.parent.mkdir()
    path.write_text('{"id": 1, "problem": "p", "answer": "12.5"}\n')
    with pytest.raises(BadRowError, match="must be an integer"):
        load_problems(str(path))


def test_limit_stops_early():
    result = load_problems(str(FIXTURES / "aime24"), limit=2)
    assert [p.answer for p in result] == ["204", "25"]
    assert len(load_problems(str(FIXTURES / "aime24"), limit=0)) == 0


def test_remote_url_is_opened_through_fsspec():
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/meljax_test/gsm8k/test.jsonl", "wb") as f:
        f.write(b'{"question": "Remote?", "answer": "x\\n#### 3"}\n')
    try:
        result = load_problems("memory://meljax_test/gsm8k/test.jsonl")
        assert result.preset == "gsm8k"
        assert _triples(result) == [("gsm8k/0", "Remote?", "3")]
    finally:
        fs.rm("/meljax_test", recursive=True)


def test_problem_is_frozen_hashable_and_json_round_trips():
    p = Problem(id="1", question="q", answer="a", extra={"k": [1, 2]})
    with pytest.raises(AttributeError):
        p.answer = "b"  # type: ignore[misc]
    assert hash(p) == hash(Problem(id="1", question="q", answer="a", extra={"k": [1, 2]}))
    assert Problem.from_json_dict(json.loads(json.dumps(p.to_json_dict()))) == p
    assert Problem(id="1", question="q", answer="a").extra == {}


# ---------------------------------------------------------------------------------------
# Real data (read only; skipped where shared/data is absent).
# ---------------------------------------------------------------------------------------

REAL_COUNTS = [
    ("dapo_math_17k", "dapo_math_17k/dapo_math_17k.parquet", 17917, 0),
    ("math", "math500/test.jsonl", 500, 0),
    ("math500", "math500/test.jsonl", 500, 0),
    ("math_train", "math_train/math.json", 7470, 4),
    ("math_test", "math_test/test.jsonl", 5000, 0),
    ("minerva_math", "minerva_math/test.jsonl", 272, 0),
    ("gsm8k", "gsm8k/test.jsonl", 1319, 0),
    ("gsm8k", "gsm8k/train.jsonl", 7473, 0),
    ("aime24", "aime24/test.jsonl", 30, 0),
    ("aime25", "aime25/aime25.jsonl", 30, 0),
    ("amc23", "amc23/test.jsonl", 40, 0),
    ("olympiadbench", "olympiadbench/test.jsonl", 675, 0),
]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
@pytest.mark.parametrize(("preset", "relpath", "count", "filtered"), REAL_COUNTS)
def test_real_data_presets_match_readme_counts(preset, relpath, count, filtered):
    result = load_problems(str(SHARED_DATA / relpath), preset)
    assert len(result) == count
    assert result.num_filtered == filtered
    assert len({p.id for p in result}) == count  # ids are unique
    assert all(p.question.strip() and p.answer.strip() for p in result)
    if preset in ("dapo_math_17k", "aime24", "aime25", "amc23"):
        # README: these ground truths are all integers.
        assert all(re.fullmatch(r"-?\d+", p.answer) for p in result)
    if preset == "olympiadbench":
        assert not any("$" in p.answer for p in result)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_real_data_spot_values():
    aime25 = load_problems(str(SHARED_DATA / "aime25"))
    readme_answers = "70 588 16 117 279 504 821 77 62 81 259 510 204 60 735 468 49 82 106 336 293 237 610 149 907 113 19 248 104 240"
    assert [p.answer for p in aime25] == readme_answers.split()
    assert not any("Please reason step by step" in p.question for p in aime25)
    # Preset inferred from the folder; the first AIME 2024 row (sorted by URL) is id 60.
    aime24 = load_problems(str(SHARED_DATA / "aime24" / "test.jsonl"))
    assert (aime24[0].id, aime24[0].answer) == ("aime24/60", "204")
    amc = load_problems(str(SHARED_DATA / "amc23"))
    assert amc[0].answer == "27"
    gsm = load_problems(str(SHARED_DATA / "gsm8k" / "test.jsonl"))
    assert gsm[0].answer == "18"
    assert all("," not in p.answer and "####" not in p.answer for p in gsm)


# ---------------------------------------------------------------------------------------
# Procedural arithmetic source.
# ---------------------------------------------------------------------------------------

_QUESTION = re.compile(r"What is (\d+) (plus|minus|times) (\d+)\?")


def test_arithmetic_default_is_single_digit_addition_with_correct_answers():
    src = ArithmeticProblems(seed=3)
    assert len(src) == 10**6
    seen = set()
    for i in range(200):
        p = src[i]
        m = _QUESTION.fullmatch(p.question)
        assert m, p.question
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        assert op == "plus" and 0 <= a <= 9 and 0 <= b <= 9
        assert p.answer == str(a + b)
        assert p.extra == {"a": a, "b": b, "op": "+"}
        seen.add((a, b))
    assert len(seen) > 50  # draws actually vary


def test_arithmetic_is_deterministic_per_seed_and_index():
    a, b, c = ArithmeticProblems(seed=1), ArithmeticProblems(seed=1), ArithmeticProblems(seed=2)
    assert [a[i] for i in (5, 0, 999_999)] == [b[i] for i in (5, 0, 999_999)]
    assert a[-1] == a[999_999]
    assert [a[i].question for i in range(50)] != [c[i].question for i in range(50)]
    assert a[7].id == "arith/1/7"
    with pytest.raises(IndexError):
        a[10**6]


def test_arithmetic_ops_and_ranges():
    src = ArithmeticProblems(seed=0, min_value=10, max_value=20, ops=("+", "-", "*"), length=300)
    ops_seen = set()
    for p in src:
        a, b, op = p.extra["a"], p.extra["b"], p.extra["op"]
        assert 10 <= a <= 20 and 10 <= b <= 20
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert p.answer == str(expected)
        assert int(p.answer) >= 0  # allow_negative=False orders subtraction operands
        ops_seen.add(op)
    assert ops_seen == {"+", "-", "*"}
    neg = ArithmeticProblems(seed=0, ops=("-",), allow_negative=True, length=200)
    assert any(p.answer.startswith("-") for p in neg)


def test_arithmetic_phrasing_and_validation():
    src = ArithmeticProblems(seed=0, phrasing="{a}{sym}{b}=", ops=("*",))
    p = src[0]
    assert p.question == f"{p.extra['a']}*{p.extra['b']}="
    with pytest.raises(ValueError, match="Unsupported ops"):
        ArithmeticProblems(ops=("/",))
    with pytest.raises(ValueError, match="min_value"):
        ArithmeticProblems(min_value=5, max_value=4)
    with pytest.raises(ValueError, match="phrasing"):
        ArithmeticProblems(phrasing="What is {x}?")


def test_arithmetic_exclude_keeps_a_held_out_set_out_and_leaves_other_items_alone():
    plain = ArithmeticProblems(seed=0, min_value=0, max_value=3)
    held_out = {f"What is {a} plus {b}?" for a in range(4) for b in range(4) if (a + b) % 2}
    src = ArithmeticProblems(seed=0, min_value=0, max_value=3, exclude=held_out)
    drawn = [src[i] for i in range(300)]
    assert not {p.question for p in drawn} & held_out
    assert {p.question for p in drawn} == {
        f"What is {a} plus {b}?" for a in range(4) for b in range(4) if (a + b) % 2 == 0
    }
    assert all(p.answer == str(p.extra["a"] + p.extra["b"]) for p in drawn)
    # Items that were not excluded are the same draws as without the exclusion.
    same = [i for i in range(300) if plain[i].question not in held_out]
    assert same and all(src[i] == plain[i] for i in same)
    everything = {f"What is {a} plus {b}?" for a in range(4) for b in range(4)}
    with pytest.raises(ValueError, match="nothing left"):
        ArithmeticProblems(min_value=0, max_value=3, exclude=everything)


# ---------------------------------------------------------------------------------------
# Grain pipelines.
# ---------------------------------------------------------------------------------------


def _ids(batch):
    return [p.id for p in batch]


def _toy_problems(n):
    return [Problem(id=str(i), question=f"q{i}", answer=str(i)) for i in range(n)]


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterator_state_resumes_at_the_exact_next_batch(num_threads):
    source = _toy_problems(23)
    it = make_problem_iterator(source, batch_size=4, seed=7, num_threads=num_threads)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    expected = [_ids(next(it)) for _ in range(3)]

    fresh = make_problem_iterator(source, batch_size=4, seed=7, num_threads=num_threads)
    fresh.set_state(state)
    assert [_ids(next(fresh)) for _ in range(3)] == expected
    # The JSON text form is accepted too.
    again = make_problem_iterator(source, batch_size=4, seed=7, num_threads=num_threads)
    again.set_state(json.dumps(state))
    assert _ids(next(again)) == expected[0]


def test_iterator_rejects_state_from_other_settings():
    source = _toy_problems(10)
    state = make_problem_iterator(source, batch_size=2, seed=1).get_state()
    other = make_problem_iterator(source, batch_size=2, seed=2)
    with pytest.raises(ValueError, match="seed: saved 1 vs now 2"):
        other.set_state(state)
    with pytest.raises(ValueError, match="Not a ProblemIterator state"):
        other.set_state({"next_index": 3})


def test_batches_are_lists_of_problems_and_seeds_change_order():
    source = _toy_problems(32)
    a = next(make_problem_iterator(source, batch_size=32, seed=0))
    b = next(make_problem_iterator(source, batch_size=32, seed=1))
    assert isinstance(a, list) and all(isinstance(p, Problem) for p in a)
    assert _ids(a) != _ids(b)
    assert sorted(_ids(a)) == sorted(_ids(b)) == sorted(str(i) for i in range(32))
    unshuffled = next(make_problem_iterator(source, batch_size=5, seed=0, shuffle=False))
    assert _ids(unshuffled) == ["0", "1", "2", "3", "4"]


def test_each_epoch_covers_every_item_once_in_a_new_order():
    source = _toy_problems(12)
    it = make_problem_iterator(source, batch_size=4, seed=5, num_epochs=2)
    batches = [_ids(b) for b in it]  # finite: ends with StopIteration
    assert len(batches) == 6
    epoch1 = sum(batches[:3], [])
    epoch2 = sum(batches[3:], [])
    assert sorted(epoch1) == sorted(epoch2) == sorted(str(i) for i in range(12))
    assert epoch1 != epoch2  # reshuffled per epoch


def test_finite_stream_last_batch_and_drop_remainder():
    source = _toy_problems(10)
    sizes = [len(b) for b in make_problem_iterator(source, batch_size=4, seed=0, num_epochs=1)]
    assert sizes == [4, 4, 2]
    dropped = make_problem_iterator(source, batch_size=4, seed=0, num_epochs=1, drop_remainder=True)
    assert [len(b) for b in dropped] == [4, 4]


def test_shards_are_disjoint_and_even():
    source = _toy_problems(11)
    shards = []
    for index in range(2):
        it = make_problem_iterator(
            source, batch_size=5, seed=3, num_epochs=1, shard_index=index, shard_count=2
        )
        shards.append([pid for batch in it for pid in _ids(batch)])
    assert len(shards[0]) == len(shards[1]) == 5  # 11 // 2, the odd item is dropped
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 10
    uneven = make_problem_iterator(
        source, batch_size=6, seed=3, num_epochs=1, shard_count=2, even_shards=False
    )
    assert len(next(uneven)) == 6
    with pytest.raises(ValueError, match="shard_index"):
        make_problem_iterator(source, batch_size=2, seed=0, shard_index=2, shard_count=2)


def test_pipeline_over_arithmetic_source_is_reproducible():
    src = ArithmeticProblems(seed=0, length=1000)
    a = [_ids(next(make_problem_iterator(src, batch_size=8, seed=4))) for _ in range(2)]
    assert a[0] == a[1]
    assert len(set(a[0])) == 8


# ---------------------------------------------------------------------------------------
# array_record storage (tfds without TensorFlow, and the raw writer).
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tfds", "array_record"])
def test_array_record_round_trip(tmp_path, backend):
    from meljax.data.tfds_builder import ArrayRecordProblems, build_array_record

    problems = list(load_problems(str(FIXTURES / "olympiadbench" / "test.jsonl")))
    problems.append(Problem(id="u", question="Ünïcode ∑ question", answer="√2", extra={}))
    path = build_array_record(problems, str(tmp_path / "out"), backend=backend)
    source = ArrayRecordProblems(path)
    assert len(source) == len(problems)
    for got, want in zip(source, problems, strict=True):
        assert got == want and got.extra == want.extra
    assert source[-1].question == "Ünïcode ∑ question"
    # Survives pickling (grain worker processes) and feeds a pipeline.
    clone = pickle.loads(pickle.dumps(source))
    assert clone[2] == problems[2]
    batch = next(make_problem_iterator(source, batch_size=4, seed=0, shuffle=False))
    assert _ids(batch) == [p.id for p in problems]
    with pytest.raises(FileExistsError):
        build_array_record(problems, str(tmp_path / "out"), backend=backend)
    build_array_record(problems[:2], str(tmp_path / "out"), backend=backend, overwrite=True)
    assert len(ArrayRecordProblems(path)) == 2


def test_tfds_dataset_is_readable_by_tfds_itself(tmp_path):
    import tensorflow_datasets as tfds

    from meljax.data.tfds_builder import build_array_record

    problems = _toy_problems(3)
    path = build_array_record(problems, str(tmp_path), name="toy", split="test")
    assert path == str(tmp_path / "toy" / "1.0.0")
    source = tfds.builder_from_directory(path).as_data_source(split="test")
    assert [source[i]["question"] for i in range(3)] == [b"q0", b"q1", b"q2"]


# ---------------------------------------------------------------------------------------
# Prompts.
# ---------------------------------------------------------------------------------------

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    import tokenizers
    import transformers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel({"[UNK]": 0, "what": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    hf.chat_template = _CHAT_TEMPLATE
    return hf


def test_chat_prompt_uses_the_tokenizer_template(tiny_tokenizer):
    text = format_prompt(
        "What is 2 plus 2?", tokenizer=tiny_tokenizer, instruction=DEMO_INSTRUCTION
    )
    assert text == "<|user|>What is 2 plus 2?\nAnswer with a number.<|end|><|assistant|>"
    with_system = format_prompt(
        "Q", tokenizer=tiny_tokenizer, instruction="", system_prompt="Be brief."
    )
    assert with_system == "<|system|>Be brief.<|end|><|user|>Q<|end|><|assistant|>"
    default = format_prompt("Q", tokenizer=tiny_tokenizer)
    assert default == f"<|user|>Q\n{DEFAULT_INSTRUCTION}<|end|><|assistant|>"
    assert "\\boxed{}" in DEFAULT_INSTRUCTION


def test_chat_prompt_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        format_prompt("Q")
    import copy

    no_template = copy.deepcopy(tiny_tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        format_prompt("Q", tokenizer=no_template)
    with pytest.raises(ValueError, match="template must be"):
        format_prompt("Q", template="jinja")  # type: ignore[arg-type]


def test_raw_prompt_templates():
    assert (
        format_prompt("What is {x}?", template="raw", instruction=DEMO_INSTRUCTION)
        == "Question: What is {x}?\nAnswer with a number.\nAnswer:"
    )
    assert format_prompt(" Q ", template="raw", instruction="") == "Question: Q\nAnswer:"
    assert (
        format_prompt(
            "Q", template="raw", instruction="I", raw_template="{instruction} {question} ="
        )
        == "I Q ="
    )
    assert (
        format_prompt("Q", template="raw", instruction="", system_prompt="S")
        == "S\n\nQuestion: Q\nAnswer:"
    )
    with pytest.raises(ValueError, match="unknown fields"):
        format_prompt("Q", template="raw", raw_template="{question} {answer}")
    with pytest.raises(ValueError, match="unknown fields"):
        format_prompt("Q", template="raw", raw_template="{question} {}")
    with pytest.raises(ValueError, match="not a valid format string"):
        format_prompt("Q", template="raw", raw_template="{question} {")
    with pytest.raises(ValueError, match="no {question}"):
        format_prompt("Q", template="raw", raw_template="{instruction}")
    assert format_prompts(["a", "b"], template="raw", instruction="") == [
        "Question: a\nAnswer:",
        "Question: b\nAnswer:",
    ]


def test_presets_all_have_default_files():
    # load_problems(folder) relies on this for every preset.
    assert all(fm.default_file for fm in PRESETS.values())


def test_data_arithmetic_exclude_file_reaches_the_training_source(tmp_path):
    from meljax.config.settings import base_config, settings
    from meljax.trainer import setup

    held = [f"What is {a} plus {b}?" for a in range(10) for b in range(10) if a < b]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "0"}) + "\n" for q in held))
    cfg = base_config()
    cfg.data.arithmetic_exclude = str(path)
    source, _ = setup.build_problem_source(settings(cfg).data, cfg.seed)
    drawn = {source[i].question for i in range(500)}
    assert drawn and not drawn & set(held)
    path.write_text("")
    with pytest.raises(ValueError, match="arithmetic_exclude"):
        setup.build_problem_source(settings(cfg).data, cfg.seed)
