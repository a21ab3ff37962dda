"""Offline analysis of a recorded trajectory (docs/spec.md §3–§9)."""
