"""Offline analysis of a recorded trajectory (SPEC §3–§9)."""
