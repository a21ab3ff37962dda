"""Concurrent analyses of one run and analysis of a run still being recorded (trajscope.io.runlock):
no lost results, no message advising to delete valid ones, results equal to a single analysis."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import trajscope
from tests.helpers.analysis import batches, make_mlp, mlp_spec, simple_run, store_arrays
from tests.helpers.scripts import script_argv
from trajscope.cli.main import main
from trajscope.io.results import open_results
from trajscope.io.runlock import LOCK_NAME, analysis_lock, holder

ROOT = Path(__file__).resolve().parents[2]


def _analyze_proc(run: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "trajscope", "analyze", str(run), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _assert_same_results(got: Path, want: Path) -> None:
    a, b = store_arrays(got), store_arrays(want)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_second_analysis_waits_for_the_first_then_adds_nothing_twice(tmp_path):
    run = tmp_path / "run"
    simple_run(run, steps=6)
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    assert main(["analyze", str(ref), "--no-progress"]) == 0
    with analysis_lock(run):
        assert holder(run) == os.getpid()
        proc = _analyze_proc(run)
        deadline = time.monotonic() + 120
        line = ""
        while "waiting" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the second analysis ended without waiting"
        assert f"another analysis of {run} is running (pid {os.getpid()})" in line
        time.sleep(0.5)
        assert not (run / "analysis.zarr").exists()  # it waits before reading or writing anything
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "delete" not in (out + err).lower()
    _assert_same_results(run, ref)


def test_two_analyses_at_once_equal_one(tmp_path):
    run = tmp_path / "run"
    simple_run(run, sizes=(6, 16, 16, 3), steps=24)
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    assert main(["analyze", str(ref), "--no-progress"]) == 0
    procs = [_analyze_proc(run) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "delete" not in (out + err).lower() and "Traceback" not in err
    # one of them analysed every checkpoint, the other found nothing new
    counts = sorted(int(out.split("analysed ")[1].split()[0]) for out, _ in results)
    assert counts == [0, len(open_results(ref).steps)]
    _assert_same_results(run, ref)


def test_analysis_while_recording_sees_committed_steps_only(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    sizes = (3, 5, 2)
    data = batches(10, sizes[0], sizes[-1])

    def train(path: Path, stop_after: int | None) -> None:
        model = make_mlp(sizes)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = nn.MSELoss()
        rec = trajscope.Recorder(path, model, opt, loss_fn, export=False, **mlp_spec(sizes))
        for t, (x, y) in enumerate(data):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()
            if t + 1 == stop_after:
                rec.flush()
                # the recorder is still open and will write more: analyse what is committed now
                assert main(["analyze", str(path), "--no-progress"]) == 0
                assert list(open_results(path).steps) == list(range(stop_after - 1))
        rec.close()

    train(run, stop_after=5)
    assert main(["analyze", str(run), "--no-progress"]) == 0
    train(ref, stop_after=None)
    assert main(["analyze", str(ref), "--no-progress"]) == 0
    assert list(open_results(run).steps) == list(range(9))
    _assert_same_results(run, ref)


def test_store_left_half_made_by_a_killed_analysis_is_discarded(tmp_path):
    run = tmp_path / "run"
    simple_run(run, steps=3)
    stray = run / ".analysis.zarr.0123.partial"
    (stray / "nodes").mkdir(parents=True)
    (stray / "zarr.json").write_text("{}")
    assert main(["analyze", str(run), "--no-progress"]) == 0
    assert not stray.exists()
    assert len(open_results(run).steps) == 2


@pytest.mark.parametrize("damage", ["truncated_root", "deleted_root", "foreign_store"])
def test_damaged_analysis_store_is_an_error_not_a_fresh_start(tmp_path, capsys, damage):
    run = tmp_path / "run"
    simple_run(run, steps=4)
    assert main(["analyze", str(run), "--no-progress", "--steps", ":2"]) == 0
    doc = run / "analysis.zarr" / "zarr.json"
    if damage == "truncated_root":
        doc.write_bytes(doc.read_bytes()[:40])
    elif damage == "deleted_root":
        doc.unlink()
    else:
        d = json.loads(doc.read_text())
        d["attributes"].pop("trajscope_format")
        doc.write_text(json.dumps(d))
    before = {p: p.read_bytes() for p in (run / "analysis.zarr").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["analyze", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "analysis.zarr" in err, err
    assert "delete" not in err.lower() and "move it aside" in err
    after = {p: p.read_bytes() for p in (run / "analysis.zarr").rglob("*") if p.is_file()}
    assert after == before  # nothing appended, nothing removed


def test_a_file_in_place_of_the_analysis_store_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    simple_run(run, steps=3)
    (run / "analysis.zarr").write_text("not a store")
    capsys.readouterr()
    assert main(["analyze", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "analysis.zarr" in err and "move it aside" in err, err
    assert (run / "analysis.zarr").read_text() == "not a store"


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen(
        script_argv(Path(__file__).parent / "lock_holder.py", str(run)),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "held"
    waited: list[str] = []
    proc.kill()
    proc.wait()
    with analysis_lock(run, on_wait=waited.append):
        assert holder(run) == os.getpid()
    assert (run / LOCK_NAME).exists()


def test_read_only_run_folder_is_one_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    simple_run(run, steps=3)

    monkeypatch.setattr("trajscope.io.runlock.LOCK_NAME", "no-such-folder/lock")  # cannot be created
    with pytest.raises(trajscope.TrajscopeError, match="writable folder"):
        trajscope.analyze(run)
