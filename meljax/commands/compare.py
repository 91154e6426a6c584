"""``meljax compare WORKDIR [WORKDIR ...] [--output=PREFIX] [--labels=A,B]``.

Puts runs side by side: one figure (``PREFIX.png``: reward, held-out accuracy with 95%
intervals, last evaluation, retention ratio, step time) and one table (``PREFIX.md``, printed,
and ``PREFIX.json``). ``PREFIX`` defaults to ``compare`` in the runs' common parent folder.
Runs without held-out evaluations still compare on their training curves.
"""

from __future__ import annotations

from absl import app, flags

from meljax.commands.common import clean_errors

_OUTPUT = flags.DEFINE_string(
    "output", None, "Path prefix of PREFIX.png / .md / .json (default: <parent>/compare)."
)
_LABELS = flags.DEFINE_list("labels", None, "One label per run (default: folder names).")


def main(argv):
    workdirs = argv[1:]
    if not workdirs:
        raise app.UsageError("name one or more run folders: meljax compare WORKDIR [WORKDIR ...]")
    with clean_errors("compare"):
        from meljax.report.compare import compare

        result = compare(workdirs, _OUTPUT.value, _LABELS.value)
    print(result.table)
    print(f"\nfigure: {result.png}\ntable:  {result.markdown}\njson:   {result.json}")


if __name__ == "__main__":
    app.run(main)
