"""The shipped sample runs and the example scripts: they run, open, analyse, and show what they claim."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import trajscope
from trajscope.dynamics.labels import LABELS

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_data"
HEALTHY, DEGENERATE, PLATEAU, SOURCE = range(4)


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(SAMPLES / name, dst)
    return dst


def _run_example(script: str, *args: str) -> None:
    """Run an example script; a failure shows its stderr (a bare exit status hides the cause)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{script} exited with {done.returncode}:\n{done.stderr[-4000:]}"


def _counts(res, layer: str) -> np.ndarray:
    lab = res.node(layer, "label")
    return np.stack([(lab == c).sum(axis=1) for c in range(len(LABELS))], axis=1)  # (K, 4)


@pytest.mark.parametrize("name", ["digits_mlp", "eos_regression", "cnn_adam"])
def test_sample_run_opens_and_says_how_it_was_made(name):
    run = trajscope.open_run(SAMPLES / name)
    assert len(run.steps) > 10
    assert run.attrs["model"]["spec"].startswith("trajscope.zoo:")
    assert "make_sample_data.py" in (SAMPLES / name / "README.md").read_text()


def test_digits_mlp_shows_every_label(tmp_path):
    run = _copy("digits_mlp", tmp_path)
    # Three phases, analysed incrementally (each call appends after the last analysed step).
    for lo, hi in ((0, 11), (150, 161), (290, 300)):
        res = trajscope.analyze(run, steps=(lo, hi), sharpness=False)[run]
    steps = res.steps
    assert steps.tolist() == [0, 5, 10, 150, 155, 160, 290, 295]  # every 5, window 2: t with t+1 recorded
    first, middle, spike = slice(0, 3), slice(3, 6), slice(6, None)
    c0, c2 = _counts(res, "0"), _counts(res, "2")
    # first layer (no weight decay): six dead ReLUs are plateaus with reason "dead" from the start
    dead0 = res.node("0", "reason")[0, :6]
    assert (res.node("0", "label")[first, :6] == PLATEAU).all()
    assert all(trajscope.io.results.open_results(run).attrs["reasons"][r] == "dead" for r in dead0)
    assert (res.node("0", "grad_norm")[first, :6] == 0).all()
    # the live units are not plateaus because of their low-variance pixels' tiny eigenvalues (issue
    # #12: the acted preset called all 32 plateaus): most are healthy sinks
    assert (c0[first, HEALTHY] >= 20).all()
    # second layer (weight decay): its dead units 0-3 decay under weight decay alone (plateau, dead),
    # then collapse to degenerate sinks; the live units are healthy sinks
    assert (res.node("2", "label")[first, :4] == PLATEAU).all()
    assert (c2[first, HEALTHY] >= 10).all()
    assert (res.node("2", "label")[middle, :4] == DEGENERATE).all()
    assert (c2[middle, HEALTHY] > 0).all()
    # the too-large learning rate phase makes sources
    assert c0[spike, SOURCE].sum() + c2[spike, SOURCE].sum() + _counts(res, "4")[spike, SOURCE].sum() > 0
    assert all(c.sum() > 0 for c in (c0[:, PLATEAU], c2[:, DEGENERATE], c2[:, HEALTHY]))


def test_digits_mlp_acted_preset_calls_the_whole_first_layer_plateau(tmp_path):
    """The observation behind issue #12, kept as the acted preset's behaviour."""
    run = _copy("digits_mlp", tmp_path)
    res = trajscope.analyze(run, steps=(0, 11), sharpness=False, preset="acted")[run]
    assert (_counts(res, "0")[:, PLATEAU] == 32).all()


def test_eos_regression_sharpness_hovers_at_threshold_while_nodes_stay(tmp_path):
    run = _copy("eos_regression", tmp_path)
    res = trajscope.analyze(run, stride=2)[run]
    sharp, thr = res.global_series("sharpness"), res.global_series("threshold")
    lr = trajscope.open_run(run).checkpoint(0).hparams[0]["lr"]
    assert thr[0] == pytest.approx(2 / lr - 0.007, rel=1e-9)  # 2/α, less the coupled weight decay
    late = sharp[len(sharp) // 2 :]
    # the stated band: late sharpness within [0.9, 1.1] × 2/α (progressive sharpening, then the edge)
    assert (late > 0.9 * 2 / lr).all() and (late < 1.1 * 2 / lr).all()
    assert sharp[0] < 0.8 * 2 / lr  # it started well below and rose
    flat = res.attrs["reasons"].index("flat_motion")
    for layer in res.layers:
        lab = res.node(layer, "label")
        # no node leaves: sinks, but for a few whose motion is weight decay's alone (|μ_u| = 1 − α·wd)
        # and carries under 1/100 of an equal share of the loss decrease: flat-motion plateaus
        assert np.isin(lab, (HEALTHY, PLATEAU)).all() and (lab == HEALTHY).mean() > 0.9, layer
        plateau = lab == PLATEAU
        assert (res.node(layer, "reason")[plateau] == flat).all()
        assert (np.abs(res.node(layer, "loss_share")[plateau]) < 0.01).all()
        assert (res.node(layer, "hess_max") <= sharp[:, None] * (1 + 1e-4)).all()


def test_cnn_adam_analyses_conv_nodes_with_adam_map(tmp_path):
    run = _copy("cnn_adam", tmp_path)
    res = trajscope.analyze(run, steps=(0, 20))[run]
    assert list(res.layers) == ["0", "3", "7"]
    assert res.layers["0"] == 4 and res.layers["3"] == 8
    assert np.isfinite(res.global_series("precond_sharpness")).all()
    assert res.attrs["optimizer_map"][0]["kind"] == "adam"


EXAMPLES = [
    ("record_sgd.py", ["--steps", "12"]),
    ("record_adam.py", ["--steps", "12"]),
    ("record_cnn.py", ["--steps", "12"]),
    ("resume.py", []),
]


@pytest.mark.parametrize("script,args", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_scripts_record_runs_that_analyse(script, args, tmp_path):
    run = tmp_path / "run"
    _run_example(script, str(run), *args)
    trust = script == "record_adam.py"  # its model class lives in the script: the export program rebuilds it
    res = trajscope.analyze(run, trust=trust, sharpness=False)[run]
    assert len(res.steps) > 0
    assert all(res.node(layer, "label").max() < len(LABELS) for layer in res.layers)


def test_make_sample_data_short(tmp_path):
    _run_example("make_sample_data.py", str(tmp_path), "--short")
    for name in ("digits_mlp", "eos_regression", "cnn_adam"):
        run = trajscope.open_run(tmp_path / name)
        assert len(run.steps) > 0 and (tmp_path / name / "README.md").exists()
