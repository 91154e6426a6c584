"""The update side of a step, in data-flow order: rollout groups and advantages (``rollout``,
``advantages``), the batch records (``batch``), log-probs (``logprobs``), the objective
(``objective``), the jitted update (``update``) over the train state (``state``), the host loop
of passes and mini-batches (``passes``) and the optimizer (``optim``)."""
