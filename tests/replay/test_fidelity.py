"""The fidelity check: at every analysed checkpoint the replayed loss is compared with the recorded
one; a gap above the tolerance is a per-step value, a results attribute and a loud summary line."""

from __future__ import annotations

import torch
from torch import nn

import trajscope
from tests.helpers.analysis import batches, simple_run
from trajscope.cli.main import main
from trajscope.io.results import open_results


def test_faithful_replay_passes(tmp_path, capsys):
    run = tmp_path / "run"
    simple_run(run, steps=5)
    assert main(["analyze", str(run), "--no-progress", "--no-sharpness"]) == 0
    assert "WARNING" not in capsys.readouterr().out
    res = open_results(run)
    fid = res.attrs["fidelity"]
    assert fid["checked"] == 4 and fid["steps_over_tolerance"] == [] and fid["max_loss_mismatch"] < 1e-6
    assert (res.global_series("loss_mismatch") < 1e-6).all()
    assert (res.global_series("recorded_loss") == trajscope.open_run(run).losses[:4]).all()


def test_dropout_in_train_mode_is_reported(tmp_path, capsys):
    """Training with dropout on; the replay of the exported program runs in eval mode (fixed at export):
    another function. Both the replay and the fidelity check say so."""
    sizes = (3, 8, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.MSELoss()
    with trajscope.Recorder(tmp_path / "run", model, opt, loss_fn, export=True) as rec:
        for x, y in batches(5, sizes[0], sizes[-1], b=16):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "run"), "--no-progress", "--no-sharpness"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "WARNING: the replayed loss differs from the recorded loss" in out
    assert "WARNING: the model is the exported program, whose train/eval mode was fixed (eval) at export" in out
    attrs = open_results(tmp_path / "run").attrs
    fid = attrs["fidelity"]
    assert fid["steps_over_tolerance"] and fid["max_loss_mismatch"] > 1e-4
    # kept for the dashboard's banner, once, across appended analyses
    assert [w for w in attrs["warnings"] if w.startswith("WARNING: the replayed loss differs")] == [fid["note"]]


def test_fidelity_accumulates_over_appended_analyses(tmp_path):
    run = tmp_path / "run"
    simple_run(run, steps=6)
    assert main(["analyze", str(run), "--no-progress", "--no-sharpness", "--steps", ":2"]) == 0
    assert main(["analyze", str(run), "--no-progress", "--no-sharpness"]) == 0
    assert open_results(run).attrs["fidelity"]["checked"] == 5
