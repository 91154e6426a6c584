"""Reading runs back: the run report (``run_report``, ``figure``), held-out tables
(``heldout``) and GRPO/MEL comparisons (``compare``), over the one statistics module
(:mod:`meljax.evaluation.stats`)."""
