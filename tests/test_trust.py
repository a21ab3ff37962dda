"""A run is data (trajscope.trust): code named inside a run is imported, called or loaded only when
the user chose it (--trust, --model/--loss), it is allow-listed, or the run is signed by this user.

Every hostile case checks a side effect that must not appear: a file the command would create, a
module that would be imported."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import trajscope
from tests.helpers.analysis import event_files, simple_run
from trajscope.cli.main import main
from trajscope.errors import TrajscopeError
from trajscope.io.results import open_results
from trajscope.trust import ALLOWED, TrustPolicy, key_path, sign, signed_by_me


def _root_doc(run: Path) -> Path:
    return run / "trajectory.zarr" / "zarr.json"


def _edit_attrs(run: Path, **changes) -> None:
    """Rewrite the run's root attributes as a hostile sender would."""
    doc = json.loads(_root_doc(run).read_text())
    for dotted, value in changes.items():
        node = doc["attributes"]
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    _root_doc(run).write_text(json.dumps(doc))


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module whose import, and whose factory, leave a mark: the marks must never appear."""
    folder = tmp_path / "evil_pkg"
    folder.mkdir()
    mark = tmp_path / "imported.mark"
    (folder / "trajscope_evil_mod.py").write_text(
        f"open({str(mark)!r}, 'w').write('imported')\n"
        f"def factory(**kw):\n    open({str(mark)!r} + '.called', 'w').write('called')\n"
        f"    import trajscope.zoo\n    return trajscope.zoo.mlp(sizes=[3, 4, 2])\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    yield "trajscope_evil_mod", mark
    sys.modules.pop("trajscope_evil_mod", None)


def _hostile_cases(mark: Path) -> dict[str, dict]:
    cmd = f"touch {mark}"
    return {
        "model_os_system": {"model__spec": "os:system", "model__kwargs": {"command": cmd}},
        "model_subprocess": {"model__spec": "subprocess:getoutput", "model__kwargs": {"cmd": cmd}},
        "loss_os_system": {"loss": {"class": "os:system", "kwargs": {"command": cmd}}},
        "loss_function_eval": {"loss": {"function": "builtins:eval"}},
        "model_eval": {
            "model__spec": "builtins:eval",
            "model__kwargs": {"source": f"__import__('os').system({cmd!r})"},
        },
        "model_import_module": {
            "model__spec": "importlib:import_module",
            "model__kwargs": {"name": "trajscope_evil_mod"},
        },
        "model_pickle_loads": {"model__spec": "pickle:loads", "model__kwargs": {"data": "x"}},
        "model_torch_load": {"model__spec": "torch:load", "model__kwargs": {"f": str(mark)}},
        "model_side_effect_module": {"model__spec": "trajscope_evil_mod:factory", "model__kwargs": {}},
        "loss_side_effect_module": {"loss": {"function": "trajscope_evil_mod:factory"}},
        "loss_allowlisted_module_other_name": {"loss": {"class": "torch.nn.modules.loss:__builtins__.eval"}},
        "model_zoo_prefix_trick": {"model__spec": "trajscope.zoo:_act.__globals__.os.system", "model__kwargs": {}},
    }


@pytest.mark.parametrize("case", list(_hostile_cases(Path("x"))))
def test_hostile_run_executes_nothing_without_trust(tmp_path, capsys, evil_module, case):
    mod, mark = evil_module
    run = tmp_path / "run"
    simple_run(run, steps=3)
    _edit_attrs(run, **_hostile_cases(mark)[case])
    capsys.readouterr()
    rc = main(["analyze", str(run), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trajscope: error:"), err
    assert "--trust" in lines[0] and "not signed by you" in lines[0], lines[0]
    assert "Traceback" not in out + err
    # nothing ran: no mark of a command, an import or a call, the module was never imported
    assert not list(tmp_path.glob("imported.mark*"))
    assert mod not in sys.modules
    assert not (run / "analysis.zarr").exists() and not event_files(run)
    # the Python API refuses the same way
    r = trajscope.open_run(run)
    with pytest.raises(TrajscopeError, match="--trust"):
        r.model() if any(k.startswith("model") for k in _hostile_cases(mark)[case]) else r.loss_fn()
    assert not list(tmp_path.glob("imported.mark*"))


def test_refusal_says_what_it_would_import(tmp_path, capsys):
    run = tmp_path / "run"
    simple_run(run, steps=3)
    _edit_attrs(run, model__spec="os:system", model__kwargs={"command": "true"})
    main(["analyze", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert "'os:system'" in err and "--model package.module:factory" in err


def test_trust_flag_runs_the_recorded_spec(tmp_path, evil_module):
    mod, mark = evil_module
    run = tmp_path / "run"
    simple_run(run, steps=3)
    _edit_attrs(run, model__spec=f"{mod}:factory", model__kwargs={})
    assert main(["analyze", str(run), "--no-progress", "--no-sharpness", "--trust"]) == 0
    assert mark.exists() and Path(str(mark) + ".called").exists()
    assert len(open_results(run).steps) == 2


def test_user_named_model_and_loss_need_no_trust(tmp_path):
    run = tmp_path / "run"
    simple_run(run, steps=3)
    _edit_attrs(run, model__spec="os:system", loss={"class": "os:system"})
    rc = main(
        [
            "analyze",
            str(run),
            "--no-progress",
            "--no-sharpness",
            "--model",
            "trajscope.zoo:mlp",
            "--model-args",
            '{"sizes": [3, 4, 2]}',
            "--loss",
            "torch.nn:MSELoss",
        ]
    )
    assert rc == 0
    assert len(open_results(run).steps) == 2


def test_allowlisted_specs_of_a_foreign_run_need_no_trust(tmp_path, other_user):
    run = tmp_path / "run"
    with other_user():
        simple_run(run, steps=3)  # trajscope.zoo:mlp and torch.nn MSELoss: allow-listed
    r = trajscope.open_run(run)
    assert not TrustPolicy(r.path, r.attrs).signed
    assert r.attrs["loss"]["class"] in ALLOWED and r.attrs["model"]["spec"] in ALLOWED
    assert main(["analyze", str(run), "--no-progress", "--no-sharpness"]) == 0


def test_foreign_run_with_own_factory_needs_trust_and_signed_one_does_not(tmp_path, evil_module, other_user):
    mod, mark = evil_module
    foreign, mine = tmp_path / "foreign", tmp_path / "mine"
    with other_user():
        simple_run(foreign, steps=3, model_spec=f"{mod}:factory", model_kwargs={})
    simple_run(mine, steps=3, model_spec=f"{mod}:factory", model_kwargs={})
    assert main(["analyze", str(foreign), "--no-progress"]) == 2
    assert not mark.exists()
    assert signed_by_me(trajscope.open_run(mine).attrs)
    assert main(["analyze", str(mine), "--no-progress", "--no-sharpness"]) == 0
    assert mark.exists()


def test_signature_binds_every_field_that_names_code(tmp_path):
    run = tmp_path / "run"
    simple_run(run, steps=3)
    attrs = trajscope.open_run(run).attrs
    assert signed_by_me(attrs)
    for change in (
        {"model__kwargs": {"sizes": [3, 4, 2], "activation": "tanh"}},
        {"loss": {"class": "torch.nn.modules.loss:L1Loss", "kwargs": {}}},
        {"model__exported": "extra/model.pt2"},
        {"signature__exported_sha256": "0" * 64},
    ):
        shutil.copytree(run, tmp_path / "copy")
        _edit_attrs(tmp_path / "copy", **change)
        assert not signed_by_me(trajscope.open_run(tmp_path / "copy").attrs), change
        shutil.rmtree(tmp_path / "copy")
    # a copy of the whole run, unchanged, is still the same description: still signed
    shutil.copytree(run, tmp_path / "copy")
    assert signed_by_me(trajscope.open_run(tmp_path / "copy").attrs)


def test_swapped_exported_program_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    simple_run(run, steps=3, model_spec=None, export=True)
    assert trajscope.open_run(run).model() is not None  # signed, with the program's hash
    program = run / "trajectory.zarr" / "extra" / "model.pt2"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["analyze", str(run), "--no-progress"]) == 2
    assert "model.pt2" in capsys.readouterr().err
    assert not (run / "analysis.zarr").exists()


def test_key_is_private_and_outside_the_run(tmp_path):
    run = tmp_path / "run"
    simple_run(run, steps=3)
    key = key_path()
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
    assert not key.resolve().is_relative_to(run.resolve())
    text = key.read_text().strip()
    assert all(text not in p.read_text(errors="ignore") for p in run.rglob("*.json"))


def test_no_key_no_signature_and_recording_goes_on(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TRAJSCOPE_KEY_FILE", str(blocker / "sub" / "key"))  # cannot be created
    assert sign({"spec": "x"}, None) is None
    run = tmp_path / "run"
    simple_run(run, steps=3)
    attrs = trajscope.open_run(run).attrs
    assert attrs["signature"] is None and len(trajscope.open_run(run).steps) == 3
    assert not signed_by_me(attrs)


def test_malformed_descriptions_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    simple_run(run, steps=3)
    for change in (
        {"loss": {"class": ["os:system"]}},
        {"loss": "os:system"},
        {"model": "os:system"},
        {"model__spec": ["os:system"]},
    ):
        shutil.copytree(run, tmp_path / "copy")
        _edit_attrs(tmp_path / "copy", **change)
        capsys.readouterr()
        assert main(["analyze", str(tmp_path / "copy"), "--no-progress"]) == 2, change
        out, err = capsys.readouterr()
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err, (change, err)
        shutil.rmtree(tmp_path / "copy")


def test_key_file_env_is_this_sessions(tmp_path):
    # conftest points every test at a session key, never the tester's own ~/.config
    assert os.environ["TRAJSCOPE_KEY_FILE"] == str(key_path())
    assert "trajscope-key-" in str(key_path())


def test_info_says_what_analysis_would_import(tmp_path, capsys, other_user):
    mine, foreign = tmp_path / "mine", tmp_path / "foreign"
    simple_run(mine, steps=3)
    with other_user():
        simple_run(foreign, steps=3)
    hostile = tmp_path / "hostile"
    shutil.copytree(foreign, hostile)
    _edit_attrs(hostile, model__spec="os:system")
    for run, words in (
        (mine, "signed by you: analysed without --trust"),
        (foreign, "not signed by you; allow-listed (trajscope.zoo:mlp, torch.nn.modules.loss:MSELoss)"),
        (hostile, "analysing imports os:system only with --trust"),
    ):
        capsys.readouterr()
        assert main(["info", str(run)]) == 0
        assert words in " ".join(capsys.readouterr().out.replace("│", " ").split()), run
