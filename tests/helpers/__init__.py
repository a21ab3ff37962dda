"""Shared test helpers: recording and analysis helpers, plugin fixtures, dense references, script runner."""
