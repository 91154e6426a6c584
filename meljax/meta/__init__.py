"""Meta-experience generation for MEL (docs/mel.md, steps 4 to 7).

* :mod:`~meljax.meta.pairs`: mixed groups and contrastive pair selection.
* :mod:`~meljax.meta.templates`: the analysis instruction and replay prompt, prompt filling.
* :mod:`~meljax.meta.formats`: the analysis formats (``paper``, ``compact``) and their parsers.
* :mod:`~meljax.meta.parse`: splitting an analysis into its sections.
* :mod:`~meljax.meta.filters`: empty / truncated / answer-leak filters.
* :mod:`~meljax.meta.pipeline`: one step's analysis pass, filters, replay pass, NLL batch, log.
* :mod:`~meljax.meta.records`: the log record of one analysis, kept or dropped.
* :mod:`~meljax.meta.settings`: :class:`MetaConfig`, the ``mel`` config section.
"""

from meljax.meta.filters import contains_answer, filter_reason
from meljax.meta.formats import ANALYSIS_FORMATS, COMPACT_ANALYSIS_TEMPLATE, get_format
from meljax.meta.pairs import ContrastivePair, mixed_groups, pair_rng, select_pairs
from meljax.meta.parse import CompactAnalysis, ParsedAnalysis, parse_analysis, parse_compact
from meljax.meta.pipeline import (
    META_LOG_FILE,
    MetaCounts,
    MetaExperiencePipeline,
    MetaResult,
)
from meljax.meta.settings import MetaConfig
from meljax.meta.templates import (
    DEFAULT_ANALYSIS_TEMPLATE,
    DEFAULT_REPLAY_INSTRUCTION,
    DEFAULT_REPLAY_TEMPLATE,
    fill_analysis_prompt,
    fill_replay_prompt,
    load_template,
    shorten_middle,
)

__all__ = [
    "ANALYSIS_FORMATS",
    "COMPACT_ANALYSIS_TEMPLATE",
    "DEFAULT_ANALYSIS_TEMPLATE",
    "DEFAULT_REPLAY_INSTRUCTION",
    "DEFAULT_REPLAY_TEMPLATE",
    "META_LOG_FILE",
    "CompactAnalysis",
    "ContrastivePair",
    "MetaConfig",
    "MetaCounts",
    "MetaExperiencePipeline",
    "MetaResult",
    "ParsedAnalysis",
    "contains_answer",
    "fill_analysis_prompt",
    "fill_replay_prompt",
    "filter_reason",
    "get_format",
    "load_template",
    "mixed_groups",
    "pair_rng",
    "parse_analysis",
    "parse_compact",
    "select_pairs",
    "shorten_middle",
]
