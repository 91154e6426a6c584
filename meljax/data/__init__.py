"""Problem data: records, file readers and presets, a procedural arithmetic source,
array_record storage, grain batching pipelines and prompt formatting.

``meljax.data.tfds_builder`` (which imports tensorflow-datasets lazily) is not imported
here; import it explicitly when needed.
"""

from meljax.data.layouts import PRESETS, FieldMap, infer_preset
from meljax.data.pipeline import (
    ProblemIterator,
    make_problem_dataset,
    make_problem_iterator,
    to_problem,
)
from meljax.data.procedural import ArithmeticProblems
from meljax.data.prompts import (
    DEFAULT_INSTRUCTION,
    DEFAULT_RAW_TEMPLATE,
    DEMO_INSTRUCTION,
    format_prompt,
    format_prompts,
)
from meljax.data.records import (
    BadRow,
    BadRowError,
    LoadResult,
    Problem,
    load_problems,
)

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_RAW_TEMPLATE",
    "DEMO_INSTRUCTION",
    "PRESETS",
    "ArithmeticProblems",
    "BadRow",
    "BadRowError",
    "FieldMap",
    "LoadResult",
    "Problem",
    "ProblemIterator",
    "format_prompt",
    "format_prompts",
    "infer_preset",
    "load_problems",
    "make_problem_dataset",
    "make_problem_iterator",
    "to_problem",
]
