"""``meljax lessons WORKDIR [--show=all|kept|dropped] [--max_chars=N]``.

Lists the run's meta-experiences by step, kept and dropped, each with its fate (kept, or why
it was dropped: replay_failed, empty, truncated, malformed, leak, copied), the question and its ground
truth, the pair of answers it contrasted, the lesson (the compact rule or the paper heuristics)
and the replay answer; then the yield per reason, the share of analysis tokens that reached the
NLL term and the MEL time per step. Reads ``meta_experiences.jsonl`` and ``metrics.jsonl``;
works while the run is still going.
"""

from __future__ import annotations

from absl import app, flags

from meljax.commands.common import clean_errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (or give it as the argument).")
_SHOW = flags.DEFINE_enum(
    "show", "all", ["all", "kept", "dropped"], "Which meta-experiences to list."
)
_MAX_CHARS = flags.DEFINE_integer(
    "max_chars", 300, "Texts longer than this are shortened in the middle.", lower_bound=40
)


def _entry(record: dict, max_chars: int) -> list[str]:
    """A record in a few indented lines."""
    from meljax.meta.lessons import pair_texts
    from meljax.report.run_report import shorten

    status = record.get("status", "?")
    lines = [
        f"  [{status}] {record.get('question_id', '?')}: "
        f"{shorten(record.get('question', ''), max_chars // 2)}  "
        f"(truth {shorten(record.get('answer', ''), 40)})"
    ]
    wrong, right = pair_texts(record)
    pair = record.get("pair") or {}
    if wrong is not None or right is not None:
        lines.append(f"    wrong answer: {shorten(wrong or '', max_chars // 2)}")
        lines.append(f"    right answer: {shorten(right or '', max_chars // 2)}")
    elif pair:
        lines.append(f"    pair: answers {pair.get('incorrect')} (wrong), {pair.get('correct')}")
    lesson = record.get("lesson")
    if status == "kept" and lesson:
        copied = "  (copied from the instruction's example)" if record.get("copied_example") else ""
        lines.append(f"    lesson: {shorten(lesson, max_chars)}{copied}")
    lines.append(f"    analysis: {shorten(record.get('text', ''), max_chars)}")
    if record.get("replay_text") is not None:
        lines.append(
            f"    replay: {shorten(record['replay_text'], max_chars // 2)}  "
            f"-> {record.get('replay_extracted')}"
        )
    return lines


def lessons_text(workdir: str, show: str = "all", max_chars: int = 300) -> str:
    """What the command prints."""
    from meljax.meta import META_LOG_FILE
    from meljax.meta.lessons import by_step, overhead_line, status_counts, yield_lines
    from meljax.runtime import files

    log = files.path(workdir, META_LOG_FILE)
    records = files.read_jsonl(log) if log.exists() else []
    metrics = files.path(workdir, "metrics.jsonl")
    rows = files.read_jsonl(metrics) if metrics.exists() else []
    parts = [f"run folder: {workdir}"]
    for step, recs in by_step(records).items():
        counts = status_counts(recs)
        dropped = ", ".join(f"{s} {c}" for s, c in counts.items() if c and s != "kept")
        parts.append(
            f"\nstep {step}: {len(recs)} generated, {counts['kept']} kept"
            + (f" (dropped: {dropped})" if dropped else "")
        )
        for r in recs:
            if show == "all" or (show == "kept") == (r.get("status") == "kept"):
                parts += _entry(r, max_chars)
    parts.append("")
    if not log.exists():
        parts.append(f"no {META_LOG_FILE} in the run folder (a GRPO run, or MEL never ran)")
    else:
        parts += yield_lines(records)
    line = overhead_line(rows)
    if line:
        parts.append(line)
    return "\n".join(parts)


def main(argv):
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments: {argv[2:]}")
    workdir = argv[1] if len(argv) == 2 else _WORKDIR.value
    if len(argv) == 2 and _WORKDIR.value and _WORKDIR.value != argv[1]:
        raise app.UsageError("give the run folder once (argument or --workdir)")
    if not workdir:
        raise app.UsageError("the run folder is required: meljax lessons WORKDIR")
    with clean_errors("lessons"):
        text = lessons_text(workdir, _SHOW.value, _MAX_CHARS.value)
    print(text)


if __name__ == "__main__":
    app.run(main)
