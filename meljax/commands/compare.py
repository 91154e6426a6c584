"""``meljax compare WORKDIR [WORKDIR ...] [--output=PREFIX] [--labels=A,B]``, or by arms:
``meljax compare --arm grpo=DIR,DIR,DIR --arm mel=DIR,DIR,DIR``.

Puts runs side by side: one figure (``PREFIX.png``: reward, held-out accuracy with 95%
intervals, last evaluation, retention ratio, step time) and one table (``PREFIX.md``, printed,
and ``PREFIX.json``). ``PREFIX`` defaults to ``compare`` in the runs' common parent folder.
Runs without held-out evaluations still compare on their training curves.

An arm is a group of runs of one algorithm with different seeds (``--arm NAME=DIR,...``,
repeatable; plain WORKDIRs are grouped by algorithm when one has two runs or more). Arms add a
row each (mean ± sd over their runs) and, per pair of arms, the last held-out evaluation's
difference paired by seed and problem with its 95% intervals (see ``meljax.report.arms``).
"""

from __future__ import annotations

from absl import app, flags

from meljax.commands.common import clean_errors

_OUTPUT = flags.DEFINE_string(
    "output", None, "Path prefix of PREFIX.png / .md / .json (default: <parent>/compare)."
)
_LABELS = flags.DEFINE_list("labels", None, "One label per run (default: folder names).")
_ARM = flags.DEFINE_multi_string(
    "arm",
    [],
    "NAME=DIR[,DIR...]: one arm, its runs differing by seed (repeatable; later arms minus "
    "the first, paired by config.json's seed).",
)

USAGE = (
    "name run folders or arms: meljax compare WORKDIR [WORKDIR ...] or "
    "meljax compare --arm grpo=DIR,DIR --arm mel=DIR,DIR"
)


def main(argv):
    workdirs = argv[1:]
    if not workdirs and not _ARM.value:
        raise app.UsageError(USAGE)
    if workdirs and _ARM.value:
        raise app.UsageError("give run folders or --arm, not both: " + USAGE)
    with clean_errors("compare"):
        from meljax.report.arms import parse_arm
        from meljax.report.compare import compare

        arms = [parse_arm(spec) for spec in _ARM.value]
        result = compare(workdirs, _OUTPUT.value, _LABELS.value, arms=arms or None)
    print(result.table)
    print(f"\nfigure: {result.png}\ntable:  {result.markdown}\njson:   {result.json}")


if __name__ == "__main__":
    app.run(main)
