"""``trajscope analyze`` from the command line (docs/spec.md §1, §9, §10): real recorded runs, analysed
through ``trajscope.cli.main.main`` (and once through ``python -m trajscope``)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.analysis import event_files, simple_run
from trajscope.cli.main import main
from trajscope.io.results import open_results


def tensorboard_line(out: str) -> str:
    lines = [l for l in out.splitlines() if l.strip()]
    assert lines, "no output"
    return lines[-1]


def assert_tensorboard_command(out: str, logdir: Path) -> None:
    """The last line holds the whole command, on one line, as a shell would read it."""
    last = tensorboard_line(out)
    assert "tensorboard --logdir" in last, f"last line {last!r} is not the tensorboard command:\n{out}"
    cmd = last[last.index("tensorboard") :]
    assert shlex.split(cmd) == ["tensorboard", "--logdir", str(logdir)], f"{cmd!r}\n{out}"


@pytest.fixture
def fixed_width(monkeypatch):
    # a standard 80-column console, whatever the terminal of the test runner
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("LINES", raising=False)


# --------------------------------------------------------------------------- success
def test_cli_prints_summary_table_and_tensorboard_command(tmp_path, capsys, fixed_width):
    runs = tmp_path / "runs"
    simple_run(runs / "exp1", (3, 4, 2), steps=4)
    simple_run(runs / "exp2", (3, 5, 2), steps=3)
    rc = main(["analyze", str(runs), "--no-progress", "--dtype", "float64"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in out + err
    for name, k in (("exp1", 3), ("exp2", 2)):
        assert str(runs / name) in out.replace("\n", "")
        res = open_results(runs / name)
        assert len(res.steps) == k
        assert event_files(runs / name)
    # the table: one column per label, one row per layer, and the largest node radius
    for header in ("layer", "healthy", "degenerate", "plateau", "source", "max radius"):
        assert header in out, header
    table_rows = [l for l in out.splitlines() if l.startswith("│")]
    assert [r.split("│")[1].strip() for r in table_rows] == ["0", "2", "0", "2"]
    # label counts in the table are those of the last analysed checkpoint
    res = open_results(runs / "exp1")
    counts = [int((res.node("0", "label", -1) == c).sum()) for c in range(4)]
    assert [int(c.strip()) for c in table_rows[0].split("│")[2:6]] == counts
    assert_tensorboard_command(out, runs)


@pytest.mark.parametrize("folder", ["my runs", "sweep[lr=0.1]"], ids=["space", "brackets"])
def test_cli_tensorboard_command_with_unusual_folder_names(tmp_path, capsys, fixed_width, folder):
    # folder names users do pick: the printed command must still name exactly this folder
    runs = tmp_path / folder
    simple_run(runs / "exp1", steps=3)
    assert main(["analyze", str(runs), "--no-progress"]) == 0
    out, _ = capsys.readouterr()
    assert_tensorboard_command(out, runs)


def test_python_dash_m_trajscope_analyze(tmp_path):
    run = tmp_path / "runs" / "exp1"
    simple_run(run, steps=3)
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run(
        [sys.executable, "-m", "trajscope", "analyze", str(run), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len(open_results(run).steps) == 2
    assert_tensorboard_command(proc.stdout, run.parent)


def test_run_without_batches_is_kinematics_only(tmp_path, capsys):
    run = tmp_path / "run"
    simple_run(run, steps=4, give_batches=False)
    rc = main(["analyze", str(run), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "kinematics only" in " ".join(out.split())
    res = open_results(run)
    assert res.attrs["kinematics_only"] is True
    assert list(res.steps) == [0, 1, 2]
    assert np.isfinite(res.node("0", "rho")).all() and np.isfinite(res.node("0", "param_norm")).all()
    assert np.isnan(res.node("0", "hess_max")).all()
    assert (res.node("0", "label") == res.attrs["not_computed_code"]).all()


def test_exported_program_with_trust(tmp_path, capsys):
    run = tmp_path / "run"
    simple_run(run, steps=3, model_spec=None, export=True)
    rc = main(["analyze", str(run), "--no-progress", "--trust"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(open_results(run).steps) == 2


# --------------------------------------------------------------------------- bad input (docs/spec.md §10)
def _bad(tmp_path: Path, case: str, other_user) -> tuple[list[str], Path | None, str]:
    """argv, the run folder that must stay untouched (None: no run), a word the message must hold."""
    run = tmp_path / "run"
    if case == "missing_path":
        return [str(tmp_path / "no_such_run")], None, "no_such_run"
    if case == "file_not_a_run":
        f = tmp_path / "notes.txt"
        f.write_text("not a run")
        return [str(f)], None, "notes.txt"
    if case == "folder_without_runs":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.txt").write_text("nothing")
        return [str(tmp_path / "empty")], None, "empty"
    if case == "model_mismatch":
        simple_run(run, (3, 4, 2), steps=3)
        return [str(run), "--model", "trajscope.zoo:mlp", "--model-args", '{"sizes": [3, 5, 2]}'], run, "0.weight"
    if case == "exported_without_trust":
        with other_user():
            simple_run(run, steps=3, model_spec=None, export=True)
        return [str(run)], run, "--trust"
    if case == "probe_without_probe":
        simple_run(run, steps=3)
        return [str(run), "--batch", "probe"], run, "probe"
    if case == "modules_match_nothing":
        simple_run(run, steps=3)
        return [str(run), "--modules", "encoder.*"], run, "encoder.*"
    raise ValueError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing_path",
        "file_not_a_run",
        "folder_without_runs",
        "model_mismatch",
        "exported_without_trust",
        "probe_without_probe",
        "modules_match_nothing",
    ],
)
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, capsys, case, other_user):
    argv, run, word = _bad(tmp_path, case, other_user)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    rc = main(["analyze", *argv])
    out, err = capsys.readouterr()
    assert rc != 0
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trajscope: error:"), lines[0]
    assert word in lines[0], lines[0]
    # nothing written: no analysis.zarr, no event file, no other new file
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if run is not None:
        assert not (run / "analysis.zarr").exists()
        assert not event_files(run)
