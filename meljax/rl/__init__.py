"""The update side of a step: rollout groups and advantages (``rollout``), the batch records
(``batch``), the objective (``objective``), the jitted update (``update``) and the optimizer
(``optim``)."""
