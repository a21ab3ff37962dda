"""Every option of ``trajscope analyze`` is checked (SPEC 10): bad values are one line on stderr, a
non-zero exit and nothing written; a loss override of another class runs with a clear note."""

from __future__ import annotations

import pytest

import trajscope
from tests.helpers.analysis import simple_run, tree_digest
from trajscope.cli.main import main
from trajscope.errors import TrajscopeError
from trajscope.io.results import open_results

BAD = {
    "device_nonsense": (["--device", "nonsense"], "nonsense"),
    "device_meta": (["--device", "meta"], "meta"),
    "device_cuda_missing": (["--device", "cuda:3"], "cuda"),
    "steps_single": (["--steps", "5"], "A:B"),
    "steps_reversed": (["--steps", "9:2"], "empty"),
    "steps_equal": (["--steps", "2:2"], "empty"),
    "steps_outside": (["--steps", "1000:2000"], "selects no recorded checkpoint"),
    "steps_colon_only": (["--steps", ":"], "start, an end or both"),
    "steps_negative": (["--steps=-3:"], ">= 0"),
    "steps_words": (["--steps", "a:b"], "A:B"),
    "stride_zero": (["--stride", "0"], "stride"),
    "stride_negative": (["--stride", "-1"], "stride"),
    "stride_float": (["--stride", "1.5"], "stride"),
    "collapse_ratio_negative": (["--collapse-ratio", "-3"], "collapse ratio"),
    "collapse_ratio_one": (["--collapse-ratio", "1"], "collapse ratio"),
    "delta_negative": (["--delta", "-0.1"], "delta"),
    "delta_nan": (["--delta", "nan"], "delta"),
    "stable_window_zero": (["--stable-window", "0"], "stable_window"),
    "model_args_without_model": (["--model-args", "{bad json"], "--model-args is given without --model"),
    "loss_args_without_loss": (["--loss-args", '{"reduction": "sum"}'], "--loss-args is given without --loss"),
    "model_args_bad_json": (["--model", "trajscope.zoo:mlp", "--model-args", "{bad json"], "JSON"),
    "loss_args_not_object": (["--loss", "torch.nn:MSELoss", "--loss-args", "[1, 2]"], "JSON object"),
    "preset_unknown": (["--preset", "magic"], "preset"),
    "curvature_unknown": (["--curvature", "fisher"], "curvature"),
    "unknown_option": (["--frobnicate"], "frobnicate"),
    "loss_unimportable": (["--loss", "no_such_pkg.mod:Loss"], "no_such_pkg"),
    "model_without_colon": (["--model", "trajscope.zoo.mlp"], "package.module:factory"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run"
    simple_run(path, steps=4)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_option_is_one_line_nonzero_nothing_written(run, capsys, case):
    argv, word = BAD[case]
    before = tree_digest(run.parent)
    capsys.readouterr()
    with (
        pytest.raises(SystemExit)
        if case in ("stride_float", "unknown_option", "preset_unknown", "curvature_unknown")
        else _no_exit() as e
    ):
        rc = main(["analyze", str(run), "--no-progress", *argv])
    if e is not None and hasattr(e, "value"):
        rc = e.value.code
    out, err = capsys.readouterr()
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trajscope"), lines[0]
    assert word in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert tree_digest(run.parent) == before


class _no_exit:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"stride": 0}, "stride"),
        ({"steps": (5, 2)}, "empty"),
        ({"device": "nonsense"}, "nonsense"),
        ({"device": "meta"}, "meta"),
        ({"collapse_ratio": -3}, "collapse ratio"),
        ({"batch": "train"}, "batch"),
        ({"model_args": {"sizes": [3]}}, "--model-args"),
    ],
)
def test_python_api_checks_the_same(run, kw, word):
    with pytest.raises(TrajscopeError, match=word):
        trajscope.analyze(run, **kw)


def test_loss_override_of_another_class_runs_with_a_note(tmp_path, capsys):
    path = tmp_path / "run"
    simple_run(path, steps=3)  # recorded with MSELoss
    capsys.readouterr()
    assert main(["analyze", str(path), "--no-progress", "--no-sharpness", "--loss", "torch.nn:L1Loss"]) == 0
    out = capsys.readouterr().out
    assert "replaces the recorded loss torch.nn.modules.loss:MSELoss" in " ".join(out.split())
    assert "another function than the one trained" in open_results(path).attrs["loss_override"]


def test_loss_override_of_the_same_class_has_no_note(tmp_path, capsys):
    path = tmp_path / "run"
    simple_run(path, steps=3)
    capsys.readouterr()
    assert main(["analyze", str(path), "--no-progress", "--no-sharpness", "--loss", "torch.nn:MSELoss"]) == 0
    assert "replaces the recorded loss" not in capsys.readouterr().out
    assert open_results(path).attrs["loss_override"] is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "1:"],
        ["--steps", ":3"],
        ["--steps", "0:2"],
        ["--stride", "2"],
        ["--device", "cpu"],
        ["--collapse-ratio", "0"],
        ["--delta", "0"],
    ],
)
def test_good_options_still_work(tmp_path, argv):
    path = tmp_path / "run"
    simple_run(path, steps=4)
    assert main(["analyze", str(path), "--no-progress", "--no-sharpness", *argv]) == 0
    assert len(open_results(path).steps) >= 1


def test_selection_of_a_grown_run_with_nothing_new_is_not_an_error(tmp_path, capsys):
    path = tmp_path / "run"
    simple_run(path, steps=4)
    assert main(["analyze", str(path), "--no-progress", "--steps", "0:2"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(path), "--no-progress", "--steps", "0:2"]) == 0
    assert "nothing new to analyse" in capsys.readouterr().out
