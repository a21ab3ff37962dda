"""One analysis of a run at a time: an OS file lock on ``RUN/.trajscope-analysis.lock``.

Two ``trajscope analyze`` of one run must not interleave their reads and writes of
``analysis.zarr`` (the second would read a store the first is creating, or append the same
checkpoints twice). The second waits for the first, says so in one line, and then analyses
what is still new. ``flock`` is released by the kernel when its holder exits, even by SIGKILL,
so a crashed analysis never leaves a stale lock. It holds between processes of one machine
(and on NFS where the server supports ``flock``), not across machines of an object store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from trajscope.errors import TrajscopeError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented in docs/guide.md)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".trajscope-analysis.lock"


def holder(run_dir: str | Path) -> int | None:
    """The pid written by the analysis that holds or last held the lock, if any."""
    try:
        return int((Path(run_dir) / LOCK_NAME).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def analysis_lock(run_dir: str | Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the run's analysis lock for the ``with`` body, waiting for another holder first.

    Args:
        run_dir: the run folder.
        on_wait: called once with a one-line message when another analysis holds the lock.

    Raises:
        TrajscopeError: the lock file cannot be created (a read-only run folder).
    """
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TrajscopeError(
            f"cannot analyse {run_dir}: cannot write {path.name} there ({e.strerror}); "
            f"copy the run to a writable folder"
        ) from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    pid = holder(run_dir)
                    on_wait(
                        f"another analysis of {run_dir} is running (pid {pid if pid else '?'}): waiting for it "
                        f"to finish"
                    )
                fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
