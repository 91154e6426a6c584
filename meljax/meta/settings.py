"""Settings of the meta-experience pipeline (config section ``mel``).

Kept apart from :mod:`meljax.meta.pipeline` so the config schema can import them without the
sampler and so the pipeline module stays about the step itself.
"""

from __future__ import annotations

import dataclasses

from meljax.config.schema import option, validate_fields
from meljax.meta import templates
from meljax.meta.formats import ANALYSIS_FORMATS
from meljax.sampling import SamplingParams

__all__ = ["MetaConfig"]


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Every knob of the meta-experience pipeline (config section ``mel``; see ``meljax.config.schema``).

    An answer is correct as :func:`meljax.rewards.is_correct` says (rollouts and replay alike).
    """

    enabled: bool = option(True, "False = the plain algorithm (the paper's baseline)")
    lambda_mel: float = option(1.0, "weight of the meta-experience NLL term", minimum=0)
    max_pairs_per_query: int = option(2, "contrastive pairs per mixed question", minimum=1)
    analyses_per_pair: int = option(
        1,
        "analyses sampled per contrastive pair (the paper: 1); each is counted as generated, "
        "filtered and replayed on its own",
        minimum=1,
    )
    analysis_format: str = option(
        "paper",
        "paper (the paper's four-section analysis, docs/mel.md) | compact (one "
        '"When ..., I ..." rule '
        "and a contrast, for small models); picks the built-in instruction, replay prompt and "
        "parser",
        choices=ANALYSIS_FORMATS,
    )
    analysis_template: str = option(
        "",
        '"" = the analysis_format\'s built-in; else template text or a path to a file '
        "({question}, {incorrect_answer}, {correct_answer})",
    )
    replay_template: str = option(
        "",
        '"" = the analysis_format\'s built-in; else template text or a path to a file '
        "({experience}, {question}, optionally {instruction})",
    )
    replay_instruction: str = option(
        templates.DEFAULT_REPLAY_INSTRUCTION,
        "text at the replay template's {instruction}",
        derived="data.instruction",
    )
    analysis_max_prompt_tokens: int = option(
        1024,
        "filled analysis prompt limit (answers shortened in the middle; pairs whose "
        "question alone does not fit are skipped as too_long)",
        minimum=1,
    )
    min_answer_tokens: int = option(16, "an answer is never shortened below this", minimum=0)
    analysis_max_new_tokens: int = option(1024, "meta-experience length limit", minimum=1)
    analysis_temperature: float = option(
        1.0, "sampling temperature of the analysis pass", minimum=0
    )
    analysis_top_p: float = option(1.0, "nucleus sampling of the analysis pass", minimum=1e-9)
    analysis_top_k: int = option(0, "top-k sampling of the analysis pass (0 = off)", minimum=0)
    replay_max_new_tokens: int = option(256, "replay answer length limit", minimum=1)
    replay_temperature: float = option(
        1.0,
        "sampling temperature of the replay pass (0 = greedy: one deterministic answer)",
        minimum=0,
    )
    replay_top_p: float = option(1.0, "nucleus sampling of the replay pass", minimum=1e-9)
    replay_top_k: int = option(0, "top-k sampling of the replay pass (0 = off)", minimum=0)
    filter_leaks: bool = option(True, "drop meta-experiences that contain the ground-truth answer")
    filter_copies: bool = option(
        True,
        "drop analyses whose lesson stands verbatim in the analysis instruction (a copied "
        "worked example is not the policy's own lesson); False keeps them, flagged in the log",
    )
    filter_malformed: bool = option(
        True,
        "drop analyses missing a section or the rule of their analysis_format (counted as "
        "malformed); False keeps them, flagged in the log only",
    )
    nll_max_len: int = option(
        0,
        "tokens per NLL row (0 = analysis_max_prompt_tokens + analysis_max_new_tokens)",
        minimum=0,
    )
    nll_rows: int = option(0, "minimum NLL rows (0 = max_pairs_per_query x questions)", minimum=0)
    nll_batch_multiple: int = option(
        1, "NLL rows are a multiple of this", minimum=1, derived="the data-parallel size"
    )
    nll_bucketed: bool = option(
        False,
        "True: NLL batch sized to the kept rows (more compiles, less memory); False: "
        "one fixed shape, one compile",
    )
    seed: int = option(0, "pairs of step s come from default_rng([seed, s])", derived="seed")

    def __post_init__(self):
        validate_fields(self)
        if self.nll_max_len and self.nll_max_len < self.max_nll_row:
            raise ValueError(
                f"MetaConfig.nll_max_len={self.nll_max_len} is shorter than "
                f"analysis_max_prompt_tokens + analysis_max_new_tokens = {self.max_nll_row}"
            )

    @property
    def max_nll_row(self) -> int:
        """Longest possible NLL row: a full analysis prompt plus a full analysis."""
        return self.analysis_max_prompt_tokens + self.analysis_max_new_tokens

    @property
    def nll_length(self) -> int:
        """T of the NLL batch."""
        return self.nll_max_len or self.max_nll_row

    def max_analyses(self, num_questions: int) -> int:
        """Most analyses (and so replays) a step of ``num_questions`` questions writes: every
        question mixed, ``max_pairs_per_query`` pairs each, ``analyses_per_pair`` per pair."""
        return self.max_pairs_per_query * self.analyses_per_pair * num_questions

    def nll_min_rows(self, num_questions: int) -> int:
        """Rows of the (unbucketed) NLL batch: ``nll_rows``, else room for every analysis."""
        return self.nll_rows or max(1, self.max_analyses(num_questions))

    def analysis_sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.analysis_max_new_tokens,
            temperature=self.analysis_temperature,
            top_p=self.analysis_top_p,
            top_k=self.analysis_top_k,
            num_samples=self.analyses_per_pair,
        )

    def replay_sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.replay_max_new_tokens,
            temperature=self.replay_temperature,
            top_p=self.replay_top_p,
            top_k=self.replay_top_k,
            num_samples=1,
        )
