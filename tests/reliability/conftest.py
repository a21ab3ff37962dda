"""Fixtures of the reliability tests: real file systems that refuse writes.

``mounts`` mounts small tmpfs file systems (read-only, or of a size the test fills) and always
unmounts them at teardown, also when the test failed with files still open on them (then lazily).
The tests run as root (CI too): chmod does not stop root's writes, a read-only mount does.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


class Mounts:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.mounted: list[Path] = []

    def tmpfs(self, name: str = "mnt", size: str = "1m", ro: bool = False) -> Path:
        """A fresh tmpfs of ``size`` at ``base/name``."""
        where = self.base / name
        where.mkdir()
        self._run("mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(where))
        self.mounted.append(where)
        return where

    def remount(self, where: Path, mode: str) -> None:
        """Switch a mounted tmpfs to ``"ro"`` or ``"rw"`` (its files stay)."""
        self._run("mount", "-o", f"remount,{mode}", str(where))

    @staticmethod
    def fill(where: Path, leave: int = 0) -> Path:
        """Fill the file system of ``where`` with one file, leaving about ``leave`` bytes free."""
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        filler = where / "filler"
        with open(filler, "wb") as f:
            try:
                f.write(b"\xab" * max(0, free - leave))
            except OSError:
                pass
        return filler

    @staticmethod
    def _run(*cmd: str) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            pytest.fail(
                f"{' '.join(cmd)} failed ({r.stderr.strip()}): the reliability tests need root "
                "and tmpfs mounts (CI runs as root)"
            )

    def unmount_all(self) -> None:
        for where in reversed(self.mounted):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
        self.mounted.clear()


@pytest.fixture
def mounts(tmp_path):
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.unmount_all()
