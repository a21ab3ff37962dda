"""The Recorder against real file-system faults (issue #10 items 4 and 6).

At construction (nothing trained yet) any OSError is one ``TrajscopeError``: one line naming the
run, the reason and what to do, chained from the OSError, and nothing half-made is left behind
(no temporary store, no new folder, no writer thread or commit timer, no hooks, no atexit
handler). Mid-run the same faults warn once and stop recording; training finishes and the
committed steps stay readable and bit-exact. The faults are real: read-only and tiny tmpfs
mounts (``conftest.py``), a path that is a file, a name too long, an unprivileged process.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch

import trajscope
from tests.helpers.recording import Ref, assert_tensors_bitexact, make_batches, make_model, train
from trajscope import TrajscopeError
from trajscope.record.recorder import Recorder
from trajscope.zoo import mlp


def trainer(kind_sizes=None):
    model = make_model("tensor") if kind_sizes is None else _seeded_mlp(kind_sizes)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), torch.nn.MSELoss()


def _seeded_mlp(sizes):
    torch.manual_seed(0)
    return mlp(sizes)


class Leftovers:
    """What a refused Recorder must not leave: hooks, trajscope threads, an atexit handler."""

    def __init__(self, opt, loss_fn):
        self.opt, self.loss_fn = opt, loss_fn
        self.atexit_before = atexit._ncallbacks()
        self.threads_before = set(threading.enumerate())  # (an analysis earlier in the session keeps a pool)

    def check(self):
        assert not self.opt._optimizer_step_pre_hooks, "a step pre-hook stayed on the optimizer"
        assert not self.loss_fn._forward_hooks, "a forward hook stayed on the loss"
        assert not [t.name for t in set(threading.enumerate()) - self.threads_before], "a thread stayed"
        assert atexit._ncallbacks() == self.atexit_before, "an atexit handler stayed"


def refused(path, model, opt, loss_fn, errno_, **kw) -> TrajscopeError:
    """Construct a Recorder that the environment refuses; check the error and what is left."""
    left = Leftovers(opt, loss_fn)
    with pytest.raises(TrajscopeError) as info:
        Recorder(path, model, opt, loss_fn, export=False, **kw)
    e = info.value
    msg = str(e)
    assert "\n" not in msg and msg.startswith(f"cannot record to {path}: "), msg
    assert isinstance(e.__cause__, OSError) and e.__cause__.errno == errno_, repr(e.__cause__)
    left.check()
    return e


def store_partials(folder: Path) -> list[Path]:
    return list(folder.rglob("*.partial")) if folder.exists() else []


# --------------------------------------------------------------------------- at construction
@pytest.mark.parametrize("background", [False, True], ids=["inline", "thread"])
def test_read_only_folder_fails_at_construction(mounts, background):
    ro = mounts.tmpfs("ro", size="1m", ro=True)
    model, opt, loss_fn = trainer()
    e = refused(ro / "runs" / "x", model, opt, loss_fn, errno.EROFS, background=background)
    assert str(e) == f"cannot record to {ro / 'runs' / 'x'}: read-only file system (errno 30); choose a writable folder"
    assert not list(ro.iterdir())
    # training afterwards is the user's choice, untouched by the refused recorder
    train(model, opt, loss_fn, make_batches("tensor", 2))


def test_read_only_store_fails_a_resume_and_keeps_it(mounts):
    """A run on a file system remounted read-only: resuming it (also with a restart step, which would
    truncate) fails at construction, although nothing else writes before the first record."""
    fs = mounts.tmpfs("fs", size="4m")
    model, opt, loss_fn = trainer()
    with Recorder(fs / "run", model, opt, loss_fn, export=False) as rec:
        train(model, opt, loss_fn, make_batches("tensor", 3), rec=rec)
    mounts.remount(fs, "ro")
    for kw in ({}, {"step": 1}):
        model, opt, loss_fn = trainer()
        refused(fs / "run", model, opt, loss_fn, errno.EROFS, resume=True, **kw)
    run = trajscope.open_run(fs / "run")
    assert list(run.steps) == [0, 1, 2] and run.restarts == []


def test_path_that_is_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    for path in (f, f / "run"):
        model, opt, loss_fn = trainer()
        e = refused(path, model, opt, loss_fn, errno.EEXIST if path == f else errno.ENOTDIR)
        assert str(e) == f"cannot record to {path}: {f} is a file, not a folder; choose another path"
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_name_too_long(tmp_path):
    path = tmp_path / "runs" / ("n" * 300)
    model, opt, loss_fn = trainer()
    e = refused(path, model, opt, loss_fn, errno.ENAMETOOLONG)
    assert str(e).endswith(": file name too long (errno 36); choose a shorter path")
    assert not (tmp_path / "runs").exists()  # the folder made on the way is gone again


def test_permission_denied_as_an_unprivileged_user():
    """Root ignores permissions: the recording runs in a process of user nobody (setpriv)."""
    if not shutil.which("setpriv"):
        pytest.fail("setpriv (util-linux) is needed to run a process as an unprivileged user")
    folder = Path(tempfile.mkdtemp(prefix="trajscope-eacces-"))  # outside pytest's 0700 tmp folders
    try:
        folder.chmod(0o755)  # nobody may look, not write
        root = Path(trajscope.__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root), "HOME": str(folder), "TRAJSCOPE_KEY_FILE": str(folder / "k")}
        r = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                str(Path(__file__).parent / "unprivileged_recorder.py"),
                str(folder / "run"),
            ],
            capture_output=True,
            text=True,
            cwd=root,
            env=env,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == (
            f"error: cannot record to {folder / 'run'}: permission denied (errno 13); "
            "choose a folder you may write to, or change its permissions "
            "| cause: PermissionError 13"
        ), r.stdout + r.stderr[-2000:]
        assert not list(folder.iterdir())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_disk_full_at_construction(mounts):
    fs = mounts.tmpfs("fs", size="256k")
    # an existing run, then a full disk: a refused overwrite keeps the old run
    model, opt, loss_fn = trainer()
    with Recorder(fs / "old", model, opt, loss_fn, export=False) as rec:
        train(model, opt, loss_fn, make_batches("tensor", 2), rec=rec)
    filler = mounts.fill(fs)
    for path, kw in ((fs / "runs" / "new", {}), (fs / "old", {"overwrite": True})):
        model, opt, loss_fn = trainer()
        e = refused(path, model, opt, loss_fn, errno.ENOSPC, **kw)
        assert str(e).endswith(
            ": no space left on device (errno 28); free some space or choose a folder on another disk"
        )
    assert not (fs / "runs").exists() and not store_partials(fs)
    assert list(trajscope.open_run(fs / "old").steps) == [0, 1]

    # room for the empty store but not for the probe batch: the store just made is removed again
    filler.unlink()
    mounts.fill(fs, leave=48 * 1024)
    model, opt, loss_fn = trainer()
    probe = (torch.randn(64, 4, 256), torch.randn(64, 3))  # 256 KiB
    for background in (False, True):
        refused(fs / "runs" / "probe", model, opt, loss_fn, errno.ENOSPC, probe=probe, background=background)
        assert not (fs / "runs").exists() and not store_partials(fs)


def test_usage_errors_keep_raising_as_before(tmp_path):
    model, opt, loss_fn = trainer()
    with Recorder(tmp_path / "run", model, opt, loss_fn, export=False):
        pass
    with pytest.raises(TrajscopeError, match="already holds a recorded run: pass resume=True") as info:
        Recorder(tmp_path / "run", model, opt, loss_fn, export=False)
    assert info.value.__cause__ is None
    with pytest.raises(ValueError, match="every must be >= 1"):
        Recorder(tmp_path / "other", model, opt, loss_fn, every=0)
    other, other_opt, _ = trainer([4, 5, 3])
    with pytest.raises(TrajscopeError, match="cannot resume .* the model's parameters differ"):
        Recorder(tmp_path / "run", other, other_opt, loss_fn, export=False, resume=True)


# --------------------------------------------------------------------------- mid-run
RECORDER_THREADS = ("trajscope-writer", "trajscope-commit-timer")
SIZES = [16, 128, 16]  # 4,240 parameters: a record (θ, momentum, batch) ~36 KB


@pytest.mark.parametrize("background", [False, True], ids=["inline", "thread"])
def test_disk_full_mid_run_warns_once_and_training_finishes(mounts, background):
    n = 30
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, SIZES[0], generator=g), torch.randn(8, SIZES[-1], generator=g)) for _ in range(n)]
    model, opt, loss_fn = trainer(SIZES)
    ref = train(model, opt, loss_fn, batches, ref=Ref())

    fs = mounts.tmpfs("fs", size="320k")
    model, opt, loss_fn = trainer(SIZES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(fs / "run", model, opt, loss_fn, export=False, background=background) as rec:
            for t in range(n):
                train(model, opt, loss_fn, batches[t : t + 1], rec=rec)
                if t % 2:
                    rec.flush()  # commits as training goes (else the 0.25 s marker would hold most)
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # A chunk that fills the disk half-way is a short pwrite(): the store writes the rest, and that
    # write names the kernel's reason.
    assert len(runtime) == 1 and "No space left on device" in runtime[0] and "Training continues" in runtime[0], runtime
    assert rec.failed and "No space left on device" in rec.failed
    assert_tensors_bitexact(dict(model.named_parameters()), ref.final, "training unaffected")
    assert not [t.name for t in threading.enumerate() if t.name in RECORDER_THREADS]

    run = trajscope.open_run(fs / "run")
    k = len(run)
    assert 2 <= k < n and list(run.steps) == list(range(k)), list(run.steps)
    for ck in run:
        assert_tensors_bitexact(ck.params, ref.params[ck.step], f"theta_{ck.step}")
        x, y = batches[ck.step]
        assert torch.equal(ck.inputs, x) and torch.equal(ck.targets, y)
        assert ck.loss == ref.losses[ck.step]
