"""The write side of the ``analysis.zarr`` results format (:mod:`trajscope.io.results` defines it):
append-only rows behind the root attribute ``committed``. Imports no torch (the plugin's test
fixtures write stores with it)."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from trajscope.errors import TrajscopeError
from trajscope.io.results import (
    _RESERVED,
    BLOCK,
    FORMAT_NAME,
    FORMAT_VERSION,
    GLOBAL,
    LABELS,
    NODE_CHUNK,
    NODE_METRICS,
    _check_format,
    _dtype_of,
    _fill_of,
    _open_group,
    _store_path,
    group_name,
)

__all__ = ["ResultsWriter"]


class ResultsWriter:
    """Create ``RUN/analysis.zarr`` or open it to append checkpoints after the committed ones."""

    def __init__(
        self, run_dir: str | Path, attrs: Mapping[str, Any], layers: Mapping[str, int], expected: int = 0
    ) -> None:
        """Open or create the store.

        Args:
            run_dir: the run folder (the store is ``run_dir/analysis.zarr``).
            attrs: JSON-serialisable root attributes; merged into the existing ones (new values
                win). The keys ``trajscope_format``, ``layers``, ``committed`` are reserved.
            layers: module name -> number of nodes, in layer order.
            expected: checkpoints about to be appended: the arrays are made that long at once
                (each resize rewrites every array's metadata, ~40 files).

        Raises:
            TrajscopeError: the existing store has another format version or other layers.
        """
        self.path = _store_path(run_dir)
        bad = [k for k in attrs if k in _RESERVED]
        if bad:
            raise ValueError(f"attrs keys {bad} are reserved by the results format")
        want = [{"name": str(m), "group": group_name(str(m)), "nodes": int(n)} for m, n in layers.items()]
        self._closed = False
        self._pending: list[tuple[int, dict[str, float], dict[tuple[str, str], np.ndarray]]] = []
        self.flush_every = BLOCK
        if (self.path / "zarr.json").exists():
            self._root, self._n = self._reopen(attrs, want)
        else:
            self._root, self._n = self._create(attrs, want, max(0, int(expected))), 0
        self._layers = {d["name"]: d for d in want}
        self._open_arrays()
        self._ensure_capacity(self._n + int(expected), exact=True)
        # Resume after an interruption: rows beyond `committed` are garbage to be overwritten.
        steps = np.asarray(self._steps_arr[: self._n]) if self._n else np.zeros(0, np.int64)
        self._steps = [int(s) for s in steps]

    def _reopen(self, attrs: Mapping[str, Any], want: list[dict]) -> tuple[zarr.Group, int]:
        """The existing store, checked to be this format with these layers, ``attrs`` merged in, and its
        committed row count."""
        root = _open_group(self.path, "r+")
        _check_format(root, self.path)
        have = [dict(d) for d in root.attrs.get("layers", [])]
        if have != want:
            raise TrajscopeError(
                f"{self.path} holds layers {_describe(have)}, this analysis has {_describe(want)}: "
                f"analyse into a fresh run folder or move {self.path.name} aside"
            )
        committed = int(root.attrs.get("committed", 0))
        root.attrs.update(dict(attrs))
        return root, committed

    def _create(self, attrs: Mapping[str, Any], want: list[dict], rows: int) -> zarr.Group:
        """A new store with every standard array ``rows`` long, nothing committed."""
        if self.path.exists() and any(self.path.iterdir()):
            raise TrajscopeError(f"{self.path} exists but is not a Zarr store: move it aside and try again")
        # Built under a temporary name and renamed into place: a reader (the dashboard, another
        # process) never sees a half-made store, and a kill during creation leaves none.
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.partial")
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        # The label vocabulary is part of the contract (docs/spec.md §9): default to docs/spec.md §7's.
        root.attrs.update(
            {
                "labels": list(LABELS),
                **dict(attrs),
                "trajscope_format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
                "layers": want,
                "committed": 0,
            }
        )
        root.create_array(
            "steps", shape=(rows,), chunks=(BLOCK,), dtype=np.int64, fill_value=-1, dimension_names=("step",)
        )
        g = root.require_group("global")
        for name in GLOBAL:
            g.create_array(
                name,
                shape=(rows,),
                chunks=(BLOCK,),
                dtype=np.float64,
                fill_value=float("nan"),
                dimension_names=("step",),
            )
        nodes = root.require_group("nodes")
        for layer in want:
            lg = nodes.require_group(layer["group"])
            for metric in NODE_METRICS:
                self._create_node_array(lg, metric, layer["nodes"], _dtype_of(metric), rows)
        if self.path.exists():
            self.path.rmdir()  # an empty folder (checked above)
        os.rename(tmp, self.path)
        return _open_group(self.path, "r+")

    def _open_arrays(self) -> None:
        """Array handles, opened once: every lookup by path is a metadata read."""
        self._steps_arr = self._root["steps"]
        self._global_group = self._root["global"]
        self._globals = dict(self._global_group.arrays())
        self._node_groups = {m: self._root[f"nodes/{d['group']}"] for m, d in self._layers.items()}
        self._node_arrays = {m: dict(g.arrays()) for m, g in self._node_groups.items()}
        self._cap = self._steps_arr.shape[0]

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _create_node_array(group: zarr.Group, metric: str, n: int, dtype: np.dtype, rows: int) -> zarr.Array:
        return group.create_array(
            metric,
            shape=(rows, n),
            chunks=(BLOCK, max(1, min(n, NODE_CHUNK))),
            dtype=dtype,
            fill_value=_fill_of(dtype),
            dimension_names=("step", "node"),
        )

    def _arrays(self):
        yield self._steps_arr
        yield from self._globals.values()
        for arrays in self._node_arrays.values():
            yield from arrays.values()

    def _ensure_capacity(self, rows: int, exact: bool = False) -> None:
        if rows <= self._cap:
            return
        cap = rows if exact else int(math.ceil(rows / BLOCK) * BLOCK)
        for arr in self._arrays():
            arr.resize((cap,) + arr.shape[1:])
        self._cap = cap

    @property
    def steps(self) -> list[int]:
        """Training steps already analysed (committed or buffered for the next flush), in order."""
        return list(self._steps)

    def append(
        self, step: int, global_values: Mapping[str, float], nodes: Mapping[str, Mapping[str, np.ndarray]]
    ) -> None:
        """Buffer one analysed checkpoint; it is written and committed by :meth:`flush` (every
        ``flush_every`` checkpoints and on :meth:`close`).

        Args:
            step: its training step; strictly greater than every committed step.
            global_values: name -> scalar (loss, sharpness, threshold, extras). Missing -> NaN.
            nodes: module -> metric -> (N,) array. Every layer must be present; a missing
                metric is stored as "not computed" (NaN, -1 or 255).
        """
        if self._closed:
            raise ValueError("ResultsWriter is closed")
        step = int(step)
        if self._steps and step <= self._steps[-1]:
            raise ValueError(f"step {step} is not after the last committed step {self._steps[-1]} (append-only)")
        missing = [m for m in self._layers if m not in nodes]
        extra = [m for m in nodes if m not in self._layers]
        if missing or extra:
            raise ValueError(
                f"nodes must hold exactly the layers {list(self._layers)}; missing {missing}, unknown {extra}"
            )
        # Validate everything before anything is buffered.
        node_rows: dict[tuple[str, str], np.ndarray] = {}
        for module, metrics in nodes.items():
            n = self._layers[module]["nodes"]
            for metric, value in metrics.items():
                a = np.asarray(value)
                if a.shape != (n,):
                    raise ValueError(f"nodes[{module!r}][{metric!r}] has shape {a.shape}, expected ({n},)")
                node_rows[(module, metric)] = a
        self._pending.append(
            (step, {k: (float(v) if v is not None else float("nan")) for k, v in global_values.items()}, node_rows)
        )
        self._steps.append(step)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered checkpoints as one block per array, then advance the commit marker.

        Rows are buffered because each write is a read-modify-write of a (BLOCK, N) chunk: one
        write per block instead of one per checkpoint. Checkpoints not yet flushed when the process
        dies are simply analysed again next time.
        """
        if not self._pending:
            return
        row0, k = self._n, len(self._pending)
        self._ensure_capacity(row0 + k)
        rows = slice(row0, row0 + k)
        self._write_globals(rows)
        self._write_nodes(rows, k)
        self._steps_arr[rows] = np.array([st for st, _, _ in self._pending], dtype=np.int64)
        self._commit(row0 + k)
        self._n = row0 + k
        self._pending = []

    def _write_globals(self, rows: slice) -> None:
        """The buffered global series as rows ``rows`` (NaN where a checkpoint lacks one)."""
        names = {name for _, g, _ in self._pending for name in g}
        for name in names:
            if name not in self._globals:  # an extra global series appears: earlier rows read NaN
                self._globals[name] = self._global_group.create_array(
                    name,
                    shape=(self._cap,),
                    chunks=(BLOCK,),
                    dtype=np.float64,
                    fill_value=float("nan"),
                    dimension_names=("step",),
                )
        for name, arr in self._globals.items():
            arr[rows] = np.array([g.get(name, np.nan) for _, g, _ in self._pending], dtype=np.float64)

    def _write_nodes(self, rows: slice, k: int) -> None:
        """The ``k`` buffered checkpoints' per-node metrics as rows ``rows`` of every node array
        ("not computed" where a checkpoint lacks a metric; non-finite floats too in integer arrays)."""
        keys = {key for _, _, nr in self._pending for key in nr}
        for module, metric in keys:
            arrays = self._node_arrays[module]
            if metric not in arrays:  # an extra per-node metric
                sample = next(nr[(module, metric)] for _, _, nr in self._pending if (module, metric) in nr)
                arrays[metric] = self._create_node_array(
                    self._node_groups[module], metric, sample.shape[0], _dtype_of(metric, sample), self._cap
                )
        for module, arrays in self._node_arrays.items():
            for metric, arr in arrays.items():
                fill = _fill_of(arr.dtype)
                block = np.full((k, arr.shape[1]), fill, dtype=arr.dtype)
                for i, (_, _, nr) in enumerate(self._pending):
                    a = nr.get((module, metric))
                    if a is None:
                        continue  # not computed at this step
                    if arr.dtype.kind in "iu" and a.dtype.kind == "f":
                        a = np.where(np.isfinite(a), a, fill)
                    block[i] = a.astype(arr.dtype, copy=False)
                arr[rows, :] = block

    def _commit(self, n: int) -> None:
        # The marker: written after every chunk of the row (docs/spec.md §9: interrupted -> invisible).
        self._root.attrs["committed"] = n

    def update_attrs(self, **attrs: Any) -> None:
        """Merge JSON-serialisable root attributes (not the reserved ones)."""
        bad = [k for k in attrs if k in _RESERVED]
        if bad:
            raise ValueError(f"attrs keys {bad} are reserved by the results format")
        self._root.attrs.update(attrs)

    def close(self) -> None:
        """Flush, then trim arrays to the committed rows (exact (K,)/(K, N) shapes). Idempotent."""
        if self._closed:
            return
        self.flush()
        for arr in self._arrays():
            if arr.shape[0] != self._n:
                arr.resize((self._n,) + arr.shape[1:])
        self._cap = self._n
        self._closed = True

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe(layers: list[dict]) -> str:
    return "{" + ", ".join(f"{d.get('name')}: {d.get('nodes')}" for d in layers) + "}"
