"""Meta-experience generation for MEL (MEL.md steps 4 to 7).

* :mod:`~meljax.meta.pairs`: mixed groups and contrastive pair selection.
* :mod:`~meljax.meta.templates`: the analysis instruction and replay prompt, prompt filling.
* :mod:`~meljax.meta.parse`: splitting an analysis into its sections.
* :mod:`~meljax.meta.filters`: empty / truncated / answer-leak filters.
* :mod:`~meljax.meta.pipeline`: one step's analysis pass, filters, replay pass, NLL batch, log.
"""

from meljax.meta.filters import contains_answer, filter_reason
from meljax.meta.pairs import ContrastivePair, mixed_groups, pair_rng, select_pairs
from meljax.meta.parse import ParsedAnalysis, parse_analysis
from meljax.meta.pipeline import (
    META_LOG_FILE,
    MetaConfig,
    MetaCounts,
    MetaExperiencePipeline,
    MetaResult,
)
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
    "DEFAULT_ANALYSIS_TEMPLATE",
    "DEFAULT_REPLAY_INSTRUCTION",
    "DEFAULT_REPLAY_TEMPLATE",
    "META_LOG_FILE",
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
    "load_template",
    "mixed_groups",
    "pair_rng",
    "parse_analysis",
    "select_pairs",
    "shorten_middle",
]
