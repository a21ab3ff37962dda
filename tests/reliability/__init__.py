"""Reliability tests: SIGKILL soak, fault injection, CLI fuzzing."""
