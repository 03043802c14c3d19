"""Towers in a run: the engine's model with locked towers kept outside it, and per-batch inputs."""
