"""The fork loop of the crash-test zygotes (tests/record/crash_zygote.py, tests/reliability/zygote.py).

A zygote warms up once (imports, first torch ops), prints ``ready``, then forks one recording child
per line of stdin, so that every child starts recording within milliseconds."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


def serve_forks(child_of: Callable[[Sequence[str]], Callable[[], None]]) -> None:
    """For each stdin line: ``child_of(line.split())`` (in the zygote: a bad line fails here) gives
    the child's work; it runs in a forked process, which exits 0, or 3 after printing ``child error``.
    The zygote prints ``pid P`` when it forks and ``status S`` when the child is reaped."""
    print("ready", flush=True)
    for line in sys.stdin:
        work = child_of(line.split())
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                work()
            except BaseException as e:
                print("child error", repr(e), file=sys.stderr, flush=True)
                code = 3
            os._exit(code)
        print("pid", pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("status", status, flush=True)
