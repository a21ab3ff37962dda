"""A run path that is a URL is refused in one line everywhere, and never becomes a local folder.

``pathlib.Path("s3://bucket/run")`` is the relative path ``s3:/bucket/run``: before this check the
Recorder made a folder named ``s3:`` in the working directory and recorded there."""

from __future__ import annotations

import pytest
import torch

import trajscope
from trajscope.cli import main

URLS = ["s3://bucket/run", "gs://bucket/runs/exp1", "file:///tmp/run", "memory://run"]


def _model_and_optimizer():
    model = torch.nn.Linear(2, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("url", URLS)
def test_recorder_refuses_a_url_and_makes_no_folder(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, opt = _model_and_optimizer()
    with pytest.raises(trajscope.TrajscopeError, match="is a URL: trajscope records and reads run folders on a local"):
        trajscope.Recorder(url, model, opt, torch.nn.MSELoss())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["analyze", "info", "verify"])
def test_the_cli_refuses_a_url_in_one_line(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([command, "s3://bucket/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trajscope: error: s3://bucket/run is a URL") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_open_run_and_analyze_refuse_a_url():
    for call in (lambda: trajscope.open_run("s3://bucket/run"), lambda: trajscope.analyze("s3://bucket/run")):
        with pytest.raises(trajscope.TrajscopeError, match="s3://bucket/run is a URL"):
            call()


def test_a_local_folder_with_a_colon_is_still_a_folder(tmp_path):
    """Only scheme://... is a URL: a folder named like ``runs:v2`` records as before."""
    model, opt = _model_and_optimizer()
    run = tmp_path / "runs:v2"
    with trajscope.Recorder(str(run), model, opt, torch.nn.MSELoss(), export=False) as rec:
        x, y = torch.randn(4, 2), torch.randn(4, 2)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        rec.batch(x, y)
        opt.step()
    assert (run / "trajectory.zarr").is_dir()
