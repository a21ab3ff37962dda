"""Analysis on a device other than the CPU, without a GPU: torch's lazy-tensor device.

``--device cuda`` must keep every tensor of the autograd passes, factors, blocks and Lanczos
vectors on the analysis device, and bring the node spectra back to the CPU. torch's
TorchScript lazy-tensor device ("lazy", executed on the CPU) refuses any op that mixes its
tensors with CPU ones, as CUDA does, so an analysis there finds a tensor left behind on every
path a run takes. Each run below is analysed on the CPU here and on "lazy" in a subprocess
(the lazy backend is process-global and not thread-safe); every stored array must agree.
"""

from __future__ import annotations

import json

# imports of the cases folded from test_review_device_timer_probe (below)
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import trajscope
from tests.helpers.analysis import F64, batches, record, store_arrays
from tests.helpers.scripts import run_script
from trajscope import zoo


def _mlp_two_groups(path: Path, opt_cls, **kw) -> None:
    """tanh MLP (dim > 32: Lanczos), biases in a group of their own lr and weight decay."""
    torch.manual_seed(0)
    model = zoo.mlp([5, 8, 3], activation="tanh").to(F64)
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = opt_cls([{"params": w, "weight_decay": 0.01}, {"params": b, "weight_decay": 0.0, "lr": 0.2}], **kw)
    record(
        path,
        model,
        opt,
        nn.MSELoss(),
        batches(4, 5, 3, b=10),
        model_spec="trajscope.zoo:mlp",
        model_kwargs={"sizes": [5, 8, 3], "activation": "tanh"},
    )


def _cnn_adam(path: Path) -> None:
    torch.manual_seed(0)
    spec = {"in_channels": 1, "size": 6, "channels": [3], "classes": 4}
    model = zoo.cnn(**spec).to(F64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 1, 6, 6, generator=g, dtype=F64), torch.randint(0, 4, (5,), generator=g)) for _ in range(3)]
    record(path, model, opt, nn.CrossEntropyLoss(), data, model_spec="trajscope.zoo:cnn", model_kwargs=spec)


def _linear_sgd(path: Path) -> None:
    """4 parameters: the dense sharpness route."""
    torch.manual_seed(0)
    model = zoo.linear(3, 1).to(F64)
    record(
        path,
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.MSELoss(),
        batches(3, 3, 1),
        model_spec="trajscope.zoo:linear",
        model_kwargs={"in_features": 3, "out_features": 1},
    )


RUNS = {
    "sgd_two_groups": lambda p: _mlp_two_groups(p, torch.optim.SGD, lr=0.05, momentum=0.9),
    "sgd_two_groups_maximize": lambda p: _mlp_two_groups(p, torch.optim.SGD, lr=0.05, momentum=0.5, maximize=True),
    "adam_two_groups": lambda p: _mlp_two_groups(p, torch.optim.Adam, lr=1e-2),
    "cnn_adam": _cnn_adam,
    "linear_sgd": _linear_sgd,
}
CASES = [  # (run, options): GGN and exact blocks of every form, float32 (the host eigen kernel)
    ("sgd_two_groups", {"dtype": "float64"}),
    ("sgd_two_groups", {"dtype": "float64", "curvature": "exact"}),
    ("sgd_two_groups", {"dtype": "float32"}),
    ("sgd_two_groups_maximize", {"dtype": "float64"}),
    ("adam_two_groups", {"dtype": "float64"}),
    ("cnn_adam", {"dtype": "float64"}),
    ("cnn_adam", {"dtype": "float64", "curvature": "exact"}),
    ("linear_sgd", {"dtype": "float64"}),
]


@pytest.mark.slow
def test_lazy_device_analysis_matches_cpu(tmp_path):
    recorded = {}
    for name, make in RUNS.items():
        recorded[name] = tmp_path / "recorded" / name
        make(recorded[name])
    jobs = []
    for k, (name, opts) in enumerate(CASES):
        for side in ("cpu", "lazy"):
            shutil.copytree(recorded[name], tmp_path / side / f"{k}-{name}")
        trajscope.analyze(tmp_path / "cpu" / f"{k}-{name}", progress=False, **opts)
        jobs.append((str(tmp_path / "lazy" / f"{k}-{name}"), opts))
    done = run_script(HERE / "analyse_on_lazy.py", json.dumps(jobs), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    for k, (name, opts) in enumerate(CASES):
        ref = store_arrays(tmp_path / "cpu" / f"{k}-{name}")
        got = store_arrays(tmp_path / "lazy" / f"{k}-{name}")
        assert ref.keys() == got.keys()
        assert len(ref["steps"]) >= 2, (name, ref["steps"])
        rtol = 1e-9 if opts["dtype"] == "float64" else 1e-4
        for key, want in ref.items():
            have = got[key]
            if want.dtype.kind in "iub":
                np.testing.assert_array_equal(have, want, err_msg=f"{name} {opts} {key}")
            else:
                # λ_min is judged against the block's scale (float32 rounds it to ~eps·λ_max)
                base = ref[key.replace("hess_min", "hess_max")]
                finite = np.isfinite(base)
                scale = float(np.abs(base[finite]).max()) if finite.any() else 0.0
                if key.endswith("loss_mismatch"):  # rounding noise of a faithful replay: judged against the loss
                    scale = 1.0 / rtol * (1e-6 if opts["dtype"] == "float32" else 1e-12)
                np.testing.assert_allclose(
                    have, want, rtol=rtol, atol=rtol * scale, equal_nan=True, err_msg=f"{name} {opts} {key}"
                )
        # the paths this case is there for did run
        if name.endswith("two_groups") or name == "sgd_two_groups_maximize":
            assert np.isfinite(ref["global/sharpness"]).all()
        if name == "adam_two_groups":
            assert np.isfinite(ref["global/precond_sharpness"]).all()


# ==============================================================================================
# folded from test_review_device_timer_probe (adversarial review of device handling, the
# commit timer and the plain-Zarr probe writer): the part about this module
# ==============================================================================================
HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# device: direct calls of the analysis functions on a second device
# --------------------------------------------------------------------------------------------

DEVICE_CHECK_NAMES = [
    "node_curvature_mlp",
    "node_curvature_linear_3d_input",
    "node_curvature_conv_groups_batchnorm",
    "node_curvature_conv1d_dilated_reflect",
    "preconditioned_and_bias_group_eigvals",
    "eigen_solves_on_device",
    "float32_blocks_on_device",
    "nonfinite_on_device",
    "sharpness_and_hvp_on_device",
]


@pytest.fixture(scope="module")
def device_results() -> dict[str, str]:
    done = run_script(HERE / "device_checks.py", "lazy")
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert done.returncode == 0 and line is not None, done.stderr[-4000:]
    return json.loads(line[len("RESULTS ") :])


@pytest.mark.parametrize("name", DEVICE_CHECK_NAMES)
def test_analysis_functions_on_lazy_device_match_cpu_and_dense_references(device_results, name):
    assert name in device_results, sorted(device_results)
    assert device_results[name] == "", device_results[name]


# --------------------------------------------------------------------------------------------
# device: end to end, paths the other device tests do not take
# --------------------------------------------------------------------------------------------


def _mlp_run(path: Path, make_opt, *, sizes=(5, 8, 3), act="tanh", probe=None, blow_up: int | None = None) -> None:
    torch.manual_seed(0)
    model = zoo.mlp(list(sizes), activation=act).to(F64)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(6, sizes[0], generator=g, dtype=F64), torch.randn(6, sizes[-1], generator=g, dtype=F64))
        for _ in range(4)
    ]
    if blow_up is not None:  # an overflowing batch: an infinite loss, then non-finite parameters
        data[blow_up] = (data[blow_up][0] * 1e200, data[blow_up][1])
    record(
        path,
        model,
        make_opt(model),
        nn.MSELoss(),
        data,
        probe=probe,
        model_spec="trajscope.zoo:mlp",
        model_kwargs={"sizes": list(sizes), "activation": act},
    )


def _groups(model, **kw):
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": w, **kw}, {"params": b, "weight_decay": 0.0, "lr": 0.02}]


@pytest.mark.slow
def test_lazy_device_end_to_end_probe_batch_diverged_run_and_amsgrad(tmp_path):
    g = torch.Generator().manual_seed(5)
    probe = (torch.randn(7, 5, generator=g, dtype=F64), torch.randn(7, 3, generator=g, dtype=F64))
    runs = {
        "nesterov_probe": lambda p: _mlp_run(
            p,
            lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
            probe=probe,
        ),
        "diverged": lambda p: _mlp_run(p, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), act="relu", blow_up=2),
        "adamw_amsgrad": lambda p: _mlp_run(
            p, lambda m: torch.optim.AdamW(_groups(m, weight_decay=0.1), lr=1e-2, amsgrad=True)
        ),
    }
    cases = [
        ("nesterov_probe", {"dtype": "float64", "batch": "probe", "curvature": "exact"}),
        ("diverged", {"dtype": "float64", "all_steps": True}),
        ("adamw_amsgrad", {"dtype": "float64"}),
    ]
    jobs = []
    for k, (name, opts) in enumerate(cases):
        src = tmp_path / "rec" / name
        if not src.exists():
            runs[name](src)
        for side in ("cpu", "lazy"):
            shutil.copytree(src, tmp_path / side / str(k))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trajscope.analyze(tmp_path / "cpu" / str(k), progress=False, **opts)
        jobs.append((str(tmp_path / "lazy" / str(k)), opts))
    done = run_script(HERE / "analyse_on_lazy.py", json.dumps(jobs))
    assert done.returncode == 0, done.stderr[-4000:]
    for k, (name, opts) in enumerate(cases):
        want, got = store_arrays(tmp_path / "cpu" / str(k)), store_arrays(tmp_path / "lazy" / str(k))
        assert want.keys() == got.keys()
        for key, w in want.items():
            if w.dtype.kind in "iub":
                np.testing.assert_array_equal(got[key], w, err_msg=f"{name} {key}")
            else:
                np.testing.assert_allclose(got[key], w, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=f"{name} {key}")
        if name == "diverged":  # the paths this run is there for: an infinite loss, then non-finite parameters
            sh = want["global/sharpness"]
            assert np.isfinite(sh[:2]).all() and np.isnan(sh[2:]).all(), sh
            assert np.isinf(want["global/loss"][2]) and not np.isfinite(want["nodes/0/param_norm"][3]).any()
