"""``trajscope info`` and the CLI's answers to bad input (docs/spec.md §10): one line, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers.recording import drop_chunks, make_batches, make_model
from trajscope.cli.main import main
from trajscope.record.recorder import Recorder


def _record(path, batches=True, **kw):
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    loss_fn = torch.nn.MSELoss()
    with Recorder(
        path, model, opt, loss_fn, export=False, model_spec="trajscope.zoo:mlp", model_kwargs={"sizes": [4, 6, 3]}, **kw
    ) as rec:
        for x, y in make_batches("tensor", 6):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            if batches:
                rec.batch(x, y)
            opt.step()
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    return {"good": _record(base / "good", every=3), "nobatch": _record(base / "nobatch", batches=False)}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns without a terminal


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "run")


def assert_one_line_error(rc, err, *needles):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trajscope: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_info_good_run(runs, capsys):
    assert main(["info", str(runs["good"])]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for fact in (
        "4 recorded, steps 0..4 (every 3, window 2)",
        "last committed step",
        "SGD (1 param group)",
        "lr=0.1",
        "momentum=0.9",
        "nesterov=True",
        "MSELoss",
        "import spec trajscope.zoo:mlp",
        "inputs [5, 4] float32, targets [5, 3] float32",
        "0.weight",
        "6×4",
        "float32",
    ):
        assert fact in out, fact


def test_info_last_record_without_batch(tmp_path, capsys):
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()
    with Recorder(tmp_path / "run", model, opt, loss_fn, export=False) as rec:
        for t, (x, y) in enumerate(make_batches("tensor", 2)):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            if t == 0:
                rec.batch(x, y)
            opt.step()
    assert main(["info", str(tmp_path / "run")]) == 0
    assert "batch() was not called" in capsys.readouterr().out


def test_info_run_without_batches_says_kinematics_only(runs, capsys):
    assert main(["info", str(runs["nobatch"])]) == 0
    out = capsys.readouterr().out
    assert "none recorded" in out and "kinematics only" in out


def _bad_inputs(runs, tmp_path):
    """(argument, expected words in the error) for each bad input of docs/spec.md §10 that `info` meets."""
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hi")
    version = _copy(runs["good"], tmp_path / "v")
    meta_file = version / "trajectory.zarr" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["format_version"] = 7
    meta_file.write_text(json.dumps(meta))
    truncated = _copy(runs["good"], tmp_path / "t")
    drop_chunks(truncated, "batch/.0", 3)  # a chunk of the last committed record
    garbage = _copy(runs["good"], tmp_path / "g")
    (garbage / "trajectory.zarr" / "zarr.json").write_text("{not json")
    return {
        "not a run": (not_a_run, ["not a trajscope run"]),
        "missing path": (tmp_path / "nope", ["does not exist"]),
        "other format version": (version, ["format version 7"]),
        "truncated store": (truncated, ["missing", "truncated"]),
        "unreadable metadata": (garbage, ["cannot be opened"]),
    }


@pytest.mark.parametrize(
    "case", ["not a run", "missing path", "other format version", "truncated store", "unreadable metadata"]
)
def test_info_bad_input_in_process(runs, tmp_path, capsys, case):
    path, needles = _bad_inputs(runs, tmp_path)[case]
    rc = main(["info", str(path)])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, *needles)


@pytest.mark.parametrize("case", ["good", "not a run", "truncated store"])
def test_python_dash_m_trajscope(runs, tmp_path, case):
    """The real entry point, in a subprocess (also checks there is no traceback on stderr)."""
    if case == "good":
        path, needles = runs["good"], []
    else:
        path, needles = _bad_inputs(runs, tmp_path)[case]
    p = subprocess.run(
        [sys.executable, "-m", "trajscope", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    if case == "good":
        assert p.returncode == 0, p.stderr
        assert "4 recorded" in p.stdout and p.stderr == ""
    else:
        assert_one_line_error(p.returncode, p.stderr, *needles)
        assert p.stdout == ""


def test_cli_without_command_prints_help(capsys):
    assert main([]) != 0
    assert "usage: trajscope" in capsys.readouterr().out


def test_analyze_with_mismatching_model_names_the_parameter(runs, tmp_path, capsys):
    run = _copy(runs["good"], tmp_path)
    rc = main(
        ["analyze", str(run), "--model", "trajscope.zoo:mlp", "--model-args", '{"sizes": [4, 7, 3]}', "--no-progress"]
    )
    assert_one_line_error(rc, capsys.readouterr().err, "'0.weight'", "--model")
    assert sorted(p.name for p in run.iterdir()) == ["trajectory.zarr"]  # nothing written
