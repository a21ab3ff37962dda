"""Fuzzed command lines (SPEC 10): whatever the arguments, `trajscope` answers with exit 0, or with one
line on stderr, exit 2 and the run folder untouched; never a traceback.

Arguments are drawn from a seeded grammar of every option with good, borderline and hostile values,
so a failure names its seed and reproduces. `TRAJSCOPE_FUZZ_CASES` raises the count (default 120).
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

from tests.helpers.analysis import simple_run, tree_digest
from trajscope.cli.main import main

CASES = int(os.environ.get("TRAJSCOPE_FUZZ_CASES", "120"))

NUMBERS = [
    "0",
    "1",
    "2",
    "-1",
    "-0",
    "1e9",
    "nan",
    "inf",
    "-inf",
    "0.5",
    "1.5",
    "",
    " ",
    "x",
    "0x10",
    "1_000",
    "9" * 40,
]
STEPS = [
    "0:2",
    "1:",
    ":2",
    "5",
    "9:2",
    ":",
    "",
    "1000:2000",
    "a:b",
    "1:2:3",
    " 1 : 2 ",
    "-3:",
    "2:2",
    "0:99999999999999999999",
]
JSON = [
    "{}",
    '{"sizes": [3, 4, 2]}',
    "{bad json",
    "[1, 2]",
    "null",
    '"x"',
    '{"sizes": "x"}',
    '{"reduction": "sum"}',
    '{"a": ' * 50,
    "1e999",
]
SPECS = [
    "trajscope.zoo:mlp",
    "torch.nn:MSELoss",
    "torch.nn:L1Loss",
    "os:system",
    "no.such:thing",
    "trajscope.zoo",
    ":",
    "trajscope.zoo:",
    "torch.nn:Linear",
    "trajscope.zoo:cnn",
    "builtins:eval",
]
DEVICES = ["cpu", "cuda", "cuda:0", "cuda:7", "meta", "nonsense", "", "cpu:0", "mps", "lazy"]
STRINGS = ["", "x", "..", "/", "encoder.*", "0", "*", "%", "\x00"[:0] + "\u00e9", "-" * 3]


def _argv(rng: random.Random, run: str) -> list[str]:
    options = {
        "--steps": lambda: [f"--steps={rng.choice(STEPS)}"],
        "--stride": lambda: ["--stride", rng.choice(NUMBERS)],
        "--delta": lambda: [f"--delta={rng.choice(NUMBERS)}"],
        "--collapse-ratio": lambda: [f"--collapse-ratio={rng.choice(NUMBERS)}"],
        "--stable-window": lambda: [f"--stable-window={rng.choice(NUMBERS)}"],
        "--device": lambda: ["--device", rng.choice(DEVICES)],
        "--dtype": lambda: ["--dtype", rng.choice(["float32", "float64", "float16", ""])],
        "--batch": lambda: ["--batch", rng.choice(["step", "probe", "train"])],
        "--curvature": lambda: ["--curvature", rng.choice(["ggn", "exact", "fisher"])],
        "--preset": lambda: ["--preset", rng.choice(["acted", "seed", "magic"])],
        "--collapse-reference": lambda: ["--collapse-reference", rng.choice(["first", "layer_median", "last"])],
        "--modules": lambda: ["--modules", *rng.sample(STRINGS, rng.randint(1, 2))],
        "--model": lambda: ["--model", rng.choice(SPECS)],
        "--model-args": lambda: ["--model-args", rng.choice(JSON)],
        "--loss": lambda: ["--loss", rng.choice(SPECS)],
        "--loss-args": lambda: ["--loss-args", rng.choice(JSON)],
        "flags": lambda: rng.sample(
            ["--all-steps", "--no-sharpness", "--no-progress", "--trust", "--frobnicate"], rng.randint(1, 2)
        ),
    }
    argv = ["analyze", rng.choice([run, run, run, run + "/nope", ""]), "--no-progress", "--no-sharpness"]
    for key in rng.sample(list(options), rng.randint(1, 4)):
        argv += options[key]()
    if rng.random() < 0.1:
        argv = [rng.choice(["info", "verify", "analyse", ""]), *argv[1:2], *rng.sample(["--verify", "-x", "--help"], 1)]
    return argv


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "run"
    simple_run(path, steps=3)
    return path


def test_fuzzed_command_lines(run, capsys, monkeypatch):
    monkeypatch.chdir(run.parent)  # a relative or empty path never reaches the repository
    rng = random.Random(20261203)
    outcomes = {0: 0, 2: 0}
    for case in range(CASES):
        argv = _argv(rng, str(run))
        before = tree_digest(run)
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: --help (0) and its one-line errors (2)
            rc = e.code
        out, err = capsys.readouterr()
        where = f"case {case}: trajscope {' '.join(map(repr, argv))}\n{err}"
        assert rc in (0, 2), where
        assert "Traceback" not in out + err, where
        outcomes[rc] += 1
        if rc == 2:
            assert len(err.strip().splitlines()) == 1, where
            assert err.startswith("trajscope"), where
            assert tree_digest(run) == before, where
        elif argv[0] == "analyze":
            # a successful analysis may have written; start the next case from a fresh store
            shutil.rmtree(run / "analysis.zarr", ignore_errors=True)
            for p in run.glob("events.out.tfevents.*"):
                p.unlink()
    # the grammar reaches both outcomes
    assert outcomes[0] > 0 and outcomes[2] > CASES // 3, outcomes
