"""Metrics and logging: the ``wandb`` and ``log`` sections, the console, progress lines,
``train_log.jsonl``, ``metrics.json``, wandb and the run's curves."""
