"""The ``analysis.zarr`` results format (docs/spec.md §9): defined and read here, written by
:class:`trajscope.io.resultswriter.ResultsWriter` (which takes the format from here).

Layout of ``RUN/analysis.zarr`` (Zarr v3, readable with plain ``zarr`` and ``xarray``)::

    zarr.json                     root attributes: the caller's attrs (label and reason
                                  vocabularies, thresholds, semantics, curvature kind,
                                  optimizer map, package version, ...) plus the reserved
                                  keys ``trajscope_format``, ``layers`` and ``committed``
    steps                         (K,) int64, dimension "step"
    global/<name>                 (K,) float64, dimension "step": loss, sharpness, threshold,
                                  and any extra global series (precond_sharpness, n_hvp, ...)
    nodes/<module>/<metric>       (K, N) dimensions ("step", "node"):
                                  float32 hess_max hess_min spectral_radius grad_norm
                                          param_norm rho drift motion_radius loss_share
                                  int32   null_dims neutral_dims        (-1 = not computed)
                                  uint8   label stable_label reason     (255 = not computed)

Module names are used as group names as they are (Zarr v3 allows dots: ``nodes/net.0``).
The root attribute ``layers`` is the authority: a list of ``{"name", "group", "nodes"}``
in layer order. Only names Zarr cannot hold are escaped (``%`` -> ``%25``, ``/`` -> ``%2F``,
the empty name of a model that is itself one layer -> ``%root``).

Append-only commits. Rows are written chunk by chunk, then the root attribute
``committed`` (the number of valid rows) is rewritten; Zarr's local store writes every file
atomically (temporary file + rename), so a reader that trusts ``committed`` never sees a
half-written row, and an interrupted analysis is resumed by overwriting the uncommitted
row. While a writer is open the arrays have a capacity that grows in blocks of
``BLOCK`` rows (so appending never rewrites array metadata for each row); :meth:`close`
trims every array to exactly ``committed`` rows, so a finished store has the ``(K,)`` /
``(K, N)`` shapes of the contract for readers that ignore the marker.

This module must not import torch: the TensorBoard plugin imports it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from trajscope.errors import TrajscopeError

__all__ = [
    "LABELS",
    "NODE_FLOAT",
    "NODE_INT",
    "NODE_U8",
    "NODE_METRICS",
    "GLOBAL",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "STORE_NAME",
    "UNSET_U8",
    "UNSET_INT",
    "Results",
    "open_results",
    "results_exist",
    "discard_partial_stores",
    "group_name",
]

LABELS = ("healthy_sink", "degenerate_sink", "plateau", "source")  # codes 0..3 (docs/spec.md §7)
NODE_FLOAT = (
    "hess_max",
    "hess_min",
    "spectral_radius",
    "grad_norm",
    "param_norm",
    "rho",
    "drift",
    "motion_radius",
    "loss_share",
)
NODE_INT = ("null_dims", "neutral_dims")
NODE_U8 = ("label", "stable_label", "reason")
NODE_METRICS = NODE_FLOAT + NODE_INT + NODE_U8
GLOBAL = ("loss", "sharpness", "threshold")

FORMAT_NAME = "trajscope.analysis"
FORMAT_VERSION = 1
STORE_NAME = "analysis.zarr"
#: Fill values for rows/metrics that were not computed (a label code no vocabulary uses).
UNSET_U8 = 255
UNSET_INT = -1
#: Rows per chunk along the step axis, and the capacity growth step.
BLOCK = 32
#: Nodes per chunk along the node axis (keeps chunks ~<= 1 MiB for wide layers).
NODE_CHUNK = 8192

_RESERVED = ("trajscope_format", "layers", "committed")


def _dtype_of(metric: str, value: np.ndarray | None = None) -> np.dtype:
    if metric in NODE_FLOAT:
        return np.dtype(np.float32)
    if metric in NODE_INT:
        return np.dtype(np.int32)
    if metric in NODE_U8:
        return np.dtype(np.uint8)
    # Extra metrics keep their kind; floats are stored as float32 like the standard ones.
    dt = np.asarray(value).dtype if value is not None else np.dtype(np.float32)
    if dt.kind == "b" or dt == np.uint8:
        return np.dtype(np.uint8)
    if dt.kind in "iu":
        return np.dtype(np.int64)
    return np.dtype(np.float32)


def _fill_of(dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return float("nan")
    if dtype == np.uint8:
        return UNSET_U8
    return UNSET_INT


def group_name(module: str) -> str:
    """The Zarr group name under ``nodes/`` that holds a module's arrays (see module doc)."""
    if module == "":
        return "%root"
    return module.replace("%", "%25").replace("/", "%2F")


def _store_path(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    if p.name.endswith(".zarr") and (p / "zarr.json").exists():
        return p
    return p / STORE_NAME


def _check_format(root: zarr.Group, path: Path) -> None:
    fmt = root.attrs.get("trajscope_format")
    if not isinstance(fmt, Mapping) or fmt.get("name") != FORMAT_NAME:
        raise TrajscopeError(
            f"{path} is not a trajscope analysis store (no trajscope_format attribute): move it "
            f"aside and run `trajscope analyze` again"
        )
    if fmt.get("version") != FORMAT_VERSION:
        raise TrajscopeError(
            f"{path} holds results of analysis format version {fmt.get('version')}, this trajscope reads version "
            f"{FORMAT_VERSION}: use the trajscope that wrote them, or move the store aside to re-analyse"
        )


def _open_group(path: Path, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception as exc:  # zarr raises various types for missing/garbled metadata
        raise TrajscopeError(
            f"cannot open {path} as a Zarr v3 group ({type(exc).__name__}): the analysis store is "
            f"damaged; move it aside and run `trajscope analyze` again to rebuild it"
        ) from None


class Results:
    """Read side of ``analysis.zarr``: only committed rows are visible."""

    steps: np.ndarray
    attrs: dict
    layers: dict[str, int]

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = path
        self._root = root
        self.attrs = dict(root.attrs)
        self._n = int(self.attrs.get("committed", 0))
        layer_list = self.attrs.get("layers", [])
        self.layers = {d["name"]: int(d["nodes"]) for d in layer_list}
        self._groups = {d["name"]: d["group"] for d in layer_list}
        try:
            self.steps = np.asarray(root["steps"][: self._n], dtype=np.int64)
        except Exception as exc:
            raise TrajscopeError(
                f"{path}: cannot read 'steps' ({type(exc).__name__}): the analysis store is damaged; "
                f"move it aside and run `trajscope analyze` again to rebuild it"
            ) from None

    @property
    def label_names(self) -> tuple[str, ...]:
        """The label vocabulary (codes are indices); the store's own if it has one."""
        names = self.attrs.get("labels") or self.attrs.get("label_names")
        if isinstance(names, Mapping):  # {"0": "healthy_sink", ...}
            names = [names[k] for k in sorted(names, key=int)]
        return tuple(names) if names else LABELS

    @property
    def global_names(self) -> list[str]:
        """Names of the global series, standard ones first."""
        names = sorted(k for k, _ in self._root["global"].arrays())
        return [n for n in GLOBAL if n in names] + [n for n in names if n not in GLOBAL]

    def metrics(self, layer: str) -> list[str]:
        """Names of the per-node arrays of a layer."""
        self._check_layer(layer)
        names = sorted(k for k, _ in self._root[f"nodes/{self._groups[layer]}"].arrays())
        return [m for m in NODE_METRICS if m in names] + [m for m in names if m not in NODE_METRICS]

    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise KeyError(f"unknown layer {layer!r}; layers: {', '.join(self.layers) or '(none)'}")

    def global_series(self, name: str) -> np.ndarray:
        """A global series over the committed steps, shape (K,)."""
        if name not in self._root["global"]:
            raise KeyError(f"unknown global series {name!r}; series: {', '.join(self.global_names)}")
        return np.asarray(self._root[f"global/{name}"][: self._n])

    def node(self, layer: str, metric: str, step_index: slice | int | None = None) -> np.ndarray:
        """Per-node values: (K, N) for all steps or a slice, (N,) for one step index."""
        self._check_layer(layer)
        g = self._root[f"nodes/{self._groups[layer]}"]
        if metric not in g:
            raise KeyError(f"unknown metric {metric!r} for layer {layer!r}; metrics: {', '.join(self.metrics(layer))}")
        arr = g[metric]
        if step_index is None:
            return np.asarray(arr[: self._n])
        if isinstance(step_index, slice):
            start, stop, stride = step_index.indices(self._n)
            if stride == 1:
                return np.asarray(arr[start:stop])
            return np.asarray(arr[start:stop])[::stride]
        i = int(step_index)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"step index {step_index} out of range for {self._n} analysed steps")
        return np.asarray(arr[i])

    def node_series(self, layer: str, metric: str, node: int) -> np.ndarray:
        """One node's values over the committed steps, shape (K,) (reads only its chunks)."""
        self._check_layer(layer)
        n = self.layers[layer]
        if not 0 <= int(node) < n:
            raise IndexError(f"node {node} out of range for layer {layer!r} of {n} nodes")
        g = self._root[f"nodes/{self._groups[layer]}"]
        if metric not in g:
            raise KeyError(f"unknown metric {metric!r} for layer {layer!r}; metrics: {', '.join(self.metrics(layer))}")
        return np.asarray(g[metric][: self._n, int(node)])

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"Results({str(self.path)!r}, steps={self._n}, layers={self.layers})"


def results_exist(run_dir: str | Path) -> bool:
    """Whether the run has an analysis store, complete or not: anything but nothing or an empty folder
    (a file in its place counts, so that it is reported as damaged rather than written over)."""
    path = _store_path(run_dir)
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def discard_partial_stores(run_dir: str | Path) -> None:
    """Remove stores left half-made by a killed :class:`ResultsWriter` (call under the analysis lock)."""
    path = _store_path(run_dir)
    for stray in path.parent.glob(f".{path.name}.*.partial"):
        shutil.rmtree(stray, ignore_errors=True)


def open_results(run_dir: str | Path) -> Results:
    """Open ``RUN/analysis.zarr`` (or a path to the store itself) for reading.

    Raises:
        TrajscopeError: no store, not a trajscope store, or another format version.
    """
    path = _store_path(run_dir)
    if not (path / "zarr.json").exists():
        if results_exist(run_dir):
            raise TrajscopeError(
                f"{path} has no zarr.json: the analysis store is damaged; move it aside and run "
                f"`trajscope analyze` again to rebuild it"
            )
        raise TrajscopeError(f"no {STORE_NAME} in {Path(run_dir)}: run `trajscope analyze {Path(run_dir)}` first")
    root = _open_group(path, "r")
    _check_format(root, path)
    return Results(path, root)
