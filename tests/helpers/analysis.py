"""Helpers shared by the end-to-end analysis tests (test_pipeline, test_analyze_cli).

Every test records a real run with :class:`trajscope.Recorder` (docs/spec.md §2's contract loop) into a
temporary folder and then analyses it; nothing here is mocked. Models come from
:mod:`trajscope.zoo` so that runs are replayable through an import spec.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

import trajscope
from trajscope.zoo import linear, mlp

F64 = torch.float64


# --------------------------------------------------------------------------- models and data
def make_mlp(sizes: Sequence[int], activation: str = "relu", seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(list(sizes), activation=activation).to(dtype)


def mlp_spec(sizes: Sequence[int], activation: str = "relu") -> dict[str, Any]:
    return {"model_spec": "trajscope.zoo:mlp", "model_kwargs": {"sizes": list(sizes), "activation": activation}}


def linear_spec(d_in: int, d_out: int = 1) -> dict[str, Any]:
    return {"model_spec": "trajscope.zoo:linear", "model_kwargs": {"in_features": d_in, "out_features": d_out}}


def make_linear(d_in: int, d_out: int = 1, seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(seed)
    return linear(d_in, d_out).to(dtype)


def batches(n: int, d_in: int, d_out: int, b: int = 6, seed: int = 1, dtype: torch.dtype = F64) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(b, d_in, generator=g, dtype=F64).to(dtype),
            torch.randn(b, d_out, generator=g, dtype=F64).to(dtype),
        )
        for _ in range(n)
    ]


# --------------------------------------------------------------------------- the contract loop
def record(
    path: str | Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: Callable,
    data: list,
    *,
    give_batches: bool = True,
    **recorder_kw: Any,
) -> trajscope.Recorder:
    """docs/spec.md §2's loop over ``data`` ((x, y) pairs) with a Recorder; returns the closed recorder."""
    recorder_kw.setdefault("export", False)
    with trajscope.Recorder(path, model, opt, loss_fn, **recorder_kw) as rec:
        for x, y in data:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            if give_batches:
                rec.batch(x, y)
            opt.step()
    assert rec.failed is None, rec.failed
    return rec


def simple_run(
    path: str | Path,
    sizes: Sequence[int] = (3, 4, 2),
    steps: int = 4,
    lr: float = 0.1,
    activation: str = "relu",
    dtype: torch.dtype = F64,
    **recorder_kw: Any,
) -> nn.Module:
    """A small MLP regression trained with plain SGD for ``steps`` steps, recorded into ``path``."""
    model = make_mlp(sizes, activation, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kw = {**mlp_spec(sizes, activation), **recorder_kw}
    if kw.get("model_spec") is None:
        kw.pop("model_spec", None)
        kw.pop("model_kwargs", None)
    record(path, model, opt, nn.MSELoss(), batches(steps, sizes[0], sizes[-1], dtype=dtype), **kw)
    return model


# --------------------------------------------------------------------------- reading results
def node_rows(params: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """Node vectors (N, p) of a Linear module: weight row i then bias[i] (float64)."""
    prefix = f"{module}." if module else ""
    w = params[prefix + "weight"].to(F64)
    rows = w.reshape(w.shape[0], -1)
    b = params.get(prefix + "bias")
    if b is not None:
        rows = torch.cat([rows, b.to(F64)[:, None]], dim=1)
    return rows


def flat_index(params: dict[str, torch.Tensor], names: Sequence[str], module: str, i: int) -> list[int]:
    """Positions of node i of ``module`` in the concatenation of ``params[n].flatten()`` over ``names``."""
    offsets, off = {}, 0
    for n in names:
        offsets[n] = off
        off += params[n].numel()
    prefix = f"{module}." if module else ""
    w = params[prefix + "weight"]
    fan = w[0].numel()
    idx = [offsets[prefix + "weight"] + i * fan + k for k in range(fan)]
    if prefix + "bias" in params:
        idx.append(offsets[prefix + "bias"] + i)
    return idx


def store_snapshot(run_dir: str | Path) -> dict[str, bytes]:
    """Every array of RUN/analysis.zarr (read with plain zarr), as raw bytes keyed by path."""
    root = zarr.open_group(str(Path(run_dir) / "analysis.zarr"), mode="r")
    out: dict[str, bytes] = {}

    def walk(g: zarr.Group, prefix: str) -> None:
        for name, arr in g.arrays():
            out[prefix + name] = np.ascontiguousarray(arr[...]).tobytes()
        for name, sub in g.groups():
            walk(sub, f"{prefix}{name}/")

    walk(root, "")
    return out


def store_arrays(run_dir: str | Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(Path(run_dir) / "analysis.zarr"), mode="r")
    out: dict[str, np.ndarray] = {}

    def walk(g: zarr.Group, prefix: str) -> None:
        for name, arr in g.arrays():
            out[prefix + name] = np.asarray(arr[...])
        for name, sub in g.groups():
            walk(sub, f"{prefix}{name}/")

    walk(root, "")
    return out


def tree_digest(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def event_files(run_dir: str | Path) -> list[Path]:
    return sorted(Path(run_dir).glob("events.out.tfevents.*"))


def reason_code(results: Any, name: str) -> int:
    return list(results.attrs["reasons"]).index(name)
