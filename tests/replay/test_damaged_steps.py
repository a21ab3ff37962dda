"""A damaged record is local damage (SPEC 10): its checkpoint's row is NaN and marked, with a
warning naming the step; the other checkpoints are analysed as if it were not there."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import trajscope
from tests.helpers.analysis import simple_run
from trajscope.errors import DamagedRecordError
from trajscope.io.results import open_results
from trajscope.replay.run import Run


def _damage(monkeypatch, steps: set[int]) -> None:
    real = Run.checkpoint

    def checkpoint(self, step):
        if step in steps:
            raise DamagedRecordError(self.path / "trajectory.zarr", "params/float64", step, "checksum mismatch")
        return real(self, step)

    monkeypatch.setattr(Run, "checkpoint", checkpoint)


@pytest.mark.parametrize("bad", [{2}, {0}, {0, 3}])
def test_damaged_step_is_a_marked_nan_row_and_the_rest_is_unchanged(tmp_path, monkeypatch, bad):
    run, ref = tmp_path / "run", tmp_path / "ref"
    simple_run(run, steps=6)
    shutil.copytree(run, ref)
    clean = open_results(next(iter(trajscope.analyze(ref, sharpness=False))))
    _damage(monkeypatch, bad)
    with pytest.warns(UserWarning, match=r"step \d+: .* is damaged \(checksum mismatch\)"):
        res = trajscope.analyze(run, sharpness=False)[run]
    assert list(res.steps) == list(clean.steps)
    damaged = res.global_series("damaged")
    for i, step in enumerate(res.steps):
        if step in bad:
            assert damaged[i] == 1 and np.isnan(res.global_series("loss")[i])
            assert np.isnan(res.node("0", "hess_max", i)).all()
            assert (res.node("0", "label", i) == res.attrs["not_computed_code"]).all()
        else:
            assert np.isnan(damaged[i])
            assert res.global_series("loss")[i] == clean.global_series("loss")[i]
            for metric in ("hess_max", "spectral_radius", "rho", "label"):
                np.testing.assert_array_equal(res.node("0", metric, i), clean.node("0", metric, i))
    # the collapse reference is the first row that is not damaged
    first = min(set(range(5)) - bad)
    assert res.node("0", "label", first).dtype == np.uint8


def test_every_step_damaged_is_one_line(tmp_path, monkeypatch, capsys):
    from trajscope.cli.main import main

    run = tmp_path / "run"
    simple_run(run, steps=3)
    _damage(monkeypatch, {0, 1, 2})
    assert main(["analyze", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is damaged" in err


def test_a_checkpoint_whose_analysis_fails_is_a_failed_row_not_an_abort(tmp_path, monkeypatch):
    from trajscope.analysis.checkpoint import Analyser

    run = tmp_path / "run"
    simple_run(run, steps=5)
    real = Analyser.checkpoint

    def checkpoint(self, step, succ, first_norms):
        if step == 1:
            raise RuntimeError("boom\nsecond line")
        return real(self, step, succ, first_norms)

    monkeypatch.setattr(Analyser, "checkpoint", checkpoint)
    with pytest.warns(UserWarning, match=r"step 1: RuntimeError: boom; its row is NaN \(global/failed = 1\)"):
        res = trajscope.analyze(run, sharpness=False)[run]
    assert list(res.steps) == [0, 1, 2, 3]
    failed = res.global_series("failed")
    assert failed[1] == 1 and np.isnan(failed[[0, 2, 3]]).all()
    assert np.isfinite(res.node("0", "hess_max", 2)).all()


def test_a_loss_that_cannot_be_replayed_is_one_line_before_anything_is_written(tmp_path, capsys):
    from trajscope.cli.main import main

    run = tmp_path / "run"
    simple_run(run, steps=3)
    capsys.readouterr()
    assert (
        main(
            [
                "analyze",
                str(run),
                "--no-progress",
                "--loss",
                "torch.nn:CrossEntropyLoss",
                "--loss-args",
                '{"reduction": "none"}',
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "replaying the loss on step 0's batch failed" in err, err
    assert not (run / "analysis.zarr").exists()
