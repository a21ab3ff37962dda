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
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers.analysis import F64, batches, record, store_arrays
from torch import nn

import trajscope
from trajscope import zoo

ANALYSE_ON_LAZY = """
import json, sys
import torch, torch._lazy.ts_backend
torch._lazy.ts_backend.init()
torch.set_num_threads(1)  # lazy tensors are not thread-safe: no eigen pool
import trajscope
for run, opts in json.loads(sys.argv[1]):
    trajscope.analyze(run, device="lazy", progress=False, **opts)
"""


def _mlp_two_groups(path: Path, opt_cls, **kw) -> None:
    """tanh MLP (dim > 32: Lanczos), biases in a group of their own lr and weight decay."""
    torch.manual_seed(0)
    model = zoo.mlp([5, 8, 3], activation="tanh").to(F64)
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = opt_cls([{"params": w, "weight_decay": 0.01}, {"params": b, "weight_decay": 0.0, "lr": 0.2}], **kw)
    record(path, model, opt, nn.MSELoss(), batches(4, 5, 3, b=10),
           model_spec="trajscope.zoo:mlp", model_kwargs={"sizes": [5, 8, 3], "activation": "tanh"})


def _cnn_adam(path: Path) -> None:
    torch.manual_seed(0)
    spec = {"in_channels": 1, "size": 6, "channels": [3], "classes": 4}
    model = zoo.cnn(**spec).to(F64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 1, 6, 6, generator=g, dtype=F64), torch.randint(0, 4, (5,), generator=g))
            for _ in range(3)]
    record(path, model, opt, nn.CrossEntropyLoss(), data, model_spec="trajscope.zoo:cnn", model_kwargs=spec)


def _linear_sgd(path: Path) -> None:
    """4 parameters: the dense sharpness route."""
    torch.manual_seed(0)
    model = zoo.linear(3, 1).to(F64)
    record(path, model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), batches(3, 3, 1),
           model_spec="trajscope.zoo:linear", model_kwargs={"in_features": 3, "out_features": 1})


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
    done = subprocess.run([sys.executable, "-c", ANALYSE_ON_LAZY, json.dumps(jobs)], capture_output=True,
                          text=True, timeout=600)
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
                if key.endswith("loss_mismatch"):   # rounding noise of a faithful replay: judged against the loss
                    scale = 1.0 / rtol * (1e-6 if opts["dtype"] == "float32" else 1e-12)
                np.testing.assert_allclose(have, want, rtol=rtol, atol=rtol * scale, equal_nan=True,
                                           err_msg=f"{name} {opts} {key}")
        # the paths this case is there for did run
        if name.endswith("two_groups") or name == "sgd_two_groups_maximize":
            assert np.isfinite(ref["global/sharpness"]).all()
        if name == "adam_two_groups":
            assert np.isfinite(ref["global/precond_sharpness"]).all()
