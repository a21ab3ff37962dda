"""A Recorder's construction on the file system: the folders it makes, the check that the store is
writable, and the one-line message for an ``OSError`` that refuses the run."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its ancestors that do not exist yet, deepest first."""
    out = []
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        out.append(p)
    return out


def _check_writable(folder: Path) -> None:
    """Raise the OSError that the first record would meet in ``folder`` (read-only, permission denied,
    full). A ``*.partial`` name: a process killed in between leaves what a resume removes."""
    probe = folder / f".write-check.{uuid.uuid4().hex}.partial"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


_ADVICE = {
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "choose a folder you may write to, or change its permissions",
    errno.EPERM: "choose a folder you may write to, or change its permissions",
    errno.ENOSPC: "free some space or choose a folder on another disk",
    errno.EDQUOT: "free some space (disk quota exceeded) or choose a folder on another disk",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "check the symbolic links on the path",
    errno.EMFILE: "close files or raise the limit of open files (ulimit -n)",
    errno.ENFILE: "close files or raise the limit of open files",
}


def _cannot_record(path: Path, e: OSError) -> str:
    """One line for a construction that failed on the file system: the run, the reason, what to do."""
    where = str(path)
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        file = next((p for p in (path, *path.parents) if os.path.exists(p) and not os.path.isdir(p)), None)
        if file is not None:
            return f"cannot record to {where}: {file} is a file, not a folder; choose another path"
    if e.errno is not None:
        reason = f"{os.strerror(e.errno).lower()} (errno {e.errno})"
    else:
        reason = f"{type(e).__name__}: {e}"
    advice = _ADVICE.get(e.errno, "check the folder and its disk, or choose another folder")
    return f"cannot record to {where}: {reason}; {advice}".replace("\r", " ").replace("\n", " ")
