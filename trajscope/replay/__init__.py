"""Replay of a recorded run: the run opened as checkpoints, and the forward pass as the step ran it."""
