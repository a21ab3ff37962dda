"""Run one of the tests' script files (a real module under tests/, never code in a string) in a
fresh interpreter, with the repository root on its path so that it imports ``trajscope`` and
``tests.helpers`` the way the test that starts it does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a script: this one's, the repository root first on ``PYTHONPATH``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def script_argv(script: Path, *args: str) -> list[str]:
    """The command line that runs ``script`` with this interpreter."""
    return [sys.executable, str(script), *map(str, args)]


def run_script(script: Path, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run ``script`` to its end, its output captured as text.

    Args:
        script: the script file.
        *args: its command-line arguments.
        timeout: seconds before it is killed (``subprocess.TimeoutExpired``).
        **kw: passed on to ``subprocess.run`` (``env`` is the script environment unless given).

    Returns:
        The finished process.
    """
    kw.setdefault("env", script_env())
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(script_argv(script, *args), timeout=timeout, **kw)
