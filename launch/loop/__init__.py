"""The training loop: the ``train`` section, the trainer, the run's setup, evaluation in a run and
the divergence rules."""
