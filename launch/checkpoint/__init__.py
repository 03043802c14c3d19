"""Checkpointing: the ``checkpoint`` section, save, load, resume choice, manifests and locked-tower
identities."""
