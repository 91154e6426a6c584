"""The training job: set-up, the step loop, checkpoints and metrics."""
