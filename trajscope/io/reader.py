"""The read side of the ``trajectory.zarr`` format (:mod:`trajscope.io.layout`): committed rows
only, every chunk and index read checked against its CRC32C, and the integrity checks
(:meth:`TrajectoryReader.check_structure`, :meth:`TrajectoryReader.verify_records`).

Longer than 400 lines because one class answers every read of the format (rows, batches, forward
states, hyperparameters, integrity): splitting it would scatter the checks each read shares."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from trajscope.errors import DamagedRecordError, TrajscopeError
from trajscope.io.documents import _commit_attrs, _read_group_attrs
from trajscope.io.layout import (
    CHECKSUM_VERSION,
    GRAD_NORM_COLUMNS,
    RECORD_COLUMNS,
    STORE_NAME,
    _version,
    local_run_path,
)
from trajscope.io.packing import Slot, _from_numpy, pack_sizes, restore_hparams, unflatten_batch, unpack
from trajscope.io.rankshards import _RankShards
from trajscope.io.records import ForwardState
from trajscope.io.shards import (
    _array_meta,
    _check_shard,
    _Damage,
    _leading_rows,
    _read_chunk,
    _row_shards,
    _RowShards,
    _shard_rows,
    _twice,
    _whole_array,
)


class TrajectoryReader:
    """Read side of the format: committed rows only, every chunk and shard index read checked
    against its CRC32C (format version 3; version 2 stores have none)."""

    def __init__(self, run_dir: str | Path, name: str = STORE_NAME) -> None:
        self.run_dir = local_run_path(run_dir)
        self.path = self.run_dir / name
        if not self.run_dir.exists():
            raise TrajscopeError(
                f"{self.run_dir} does not exist: give the folder a Recorder wrote (it holds {STORE_NAME})"
            )
        if not (self.path / "zarr.json").exists():
            raise TrajscopeError(
                f"{self.run_dir} is not a trajscope run: no {STORE_NAME} inside; record one with trajscope.Recorder"
            )
        self.format_version = _version(_read_group_attrs(self.path), self.path)
        self.checksums = self.format_version >= CHECKSUM_VERSION
        self._root: zarr.Group | None = None
        self._layouts: dict[str, tuple[_RowShards, tuple[int, ...]]] = {}
        c = _commit_attrs(self.path)
        # The writer describes new batch structures and state layouts before it commits the rows that
        # use them: attributes read after the marker describe every row it validates.
        self.attrs = _read_group_attrs(self.path)
        self.n_records = int(c["records"])
        self.restarts = list(c.get("restarts", []))
        self.param_layout = [Slot.from_json(s) for s in self.attrs["params"]]
        self.buffer_layout = [Slot.from_json(s) for s in self.attrs.get("buffers", [])]
        self.state_layouts = [[Slot.from_json(s) for s in lay] for lay in self.attrs.get("state_layouts", [])]
        self._records = (
            _leading_rows(self.path, "records", self.n_records, self.checksums)
            if self.n_records
            else np.zeros((0, len(RECORD_COLUMNS)))
        )
        n_sk = int(c.get("skipped", 0))
        self.skipped = (
            _leading_rows(self.path, "skipped", n_sk, self.checksums).astype(np.int64)
            if n_sk
            else np.zeros(0, np.int64)
        )
        dist = self.attrs.get("distributed")
        self.shards = (
            _RankShards(self.run_dir, int(dist["world_size"]), TrajectoryReader) if isinstance(dist, Mapping) else None
        )

    @property
    def root(self) -> zarr.Group:
        """The store through plain zarr, for inspection (the reader's own reads do not use it)."""
        if self._root is None:
            self._root = _open_root(self.path, mode="r")
        return self._root

    def _step(self, r: int) -> int | None:
        return int(self._records[r, 0]) if 0 <= r < len(self._records) else None

    def _damaged(self, name: str, r: int | None, d: _Damage) -> DamagedRecordError:
        return DamagedRecordError(self.path, name, None if r is None else self._step(r), str(d))

    def _row_layout(self, name: str) -> tuple[_RowShards, tuple[int, ...]]:
        """Row-shard layout and current shape of a per-record array (its document read once;
        _Damage if it is missing or unreadable)."""
        if name not in self._layouts:
            doc = _array_meta(self.path, name)
            lay = _row_shards(doc, self.checksums)
            try:
                shape = tuple(int(n) for n in doc["shape"])
            except (KeyError, TypeError, ValueError):
                raise _Damage("its zarr.json has no valid shape") from None
            self._layouts[name] = (lay, shape)
        return self._layouts[name]

    def _row_extents(self, name: str, shape: Sequence[int] | None) -> tuple[_RowShards, list[int]]:
        """Layout of a per-record array and the extents of a row (its leading ``shape``, if given)."""
        lay, full = self._row_layout(name)
        return lay, [min(int(e), n) for e, n in zip(shape, full[1:])] if shape is not None else list(full[1:])

    def _read_row(self, name: str, r: int, shape: Sequence[int] | None = None) -> np.ndarray:
        """One committed row (its leading ``shape`` only, if given), read straight from the shard
        files the writer filled (per chunk column one ``pread`` of the shard index and one of the
        chunk, both CRCs checked; Zarr's reader costs ~1 ms per call on top). A chunk that was never
        written, is cut short or fails its checksum raises DamagedRecordError naming the step: it
        would otherwise read back as the fill value, or as wrong numbers."""
        try:
            lay, extents = self._row_extents(name, shape)
            out = np.zeros(extents, dtype=lay.dtype.newbyteorder("="))
            for g in lay.columns(extents):
                chunk = _twice(lambda: _read_chunk(self.path / name, lay, r, g))
                dst = tuple(slice(j * c, min((j + 1) * c, e)) for j, c, e in zip(g, lay.inner, extents))
                out[dst] = chunk[tuple(slice(0, d.stop - d.start) for d in dst)]
        except _Damage as d:
            raise self._damaged(name, r, d) from None
        return out

    @property
    def steps(self) -> np.ndarray:
        return self._records[:, 0].astype(np.int64)

    @property
    def losses(self) -> np.ndarray:
        """The loss of each record; in a distributed run the mean of the ranks' losses (DDP's gradient
        is the mean of the ranks' gradients), NaN where a rank's shard of the step is missing."""
        own = self._records[:, 1]
        return own if self.shards is None else self.shards.mean_loss(self.steps, own)

    def grad_norms(self, r: int) -> dict[str, float]:
        """Record r's gradient norms by :data:`GRAD_NORM_COLUMNS` (NaN: not recorded, e.g. a store
        written before the column existed)."""
        if "grad_norms" not in self.attrs:
            return {c: math.nan for c in GRAD_NORM_COLUMNS}
        row = self._read_row("grad_norms", r)
        return {c: float(v) for c, v in zip(self.attrs["grad_norms"], row)}

    def row_of(self, step: int) -> int:
        idx = np.nonzero(self.steps == step)[0]
        if not len(idx):
            raise TrajscopeError(f"step {step} is not recorded in {self.run_dir} (recorded: {_ranges(self.steps)})")
        return int(idx[-1])

    def params(self, r: int) -> dict[str, torch.Tensor]:
        return unpack(self.param_layout, {p: self._read_row(f"params/{p}", r) for p in pack_sizes(self.param_layout)})

    def buffers(self, r: int) -> dict[str, torch.Tensor]:
        if not self.buffer_layout:
            return {}
        return unpack(
            self.buffer_layout, {p: self._read_row(f"buffers/{p}", r) for p in pack_sizes(self.buffer_layout)}
        )

    def state(self, r: int) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state per parameter name: {param: {key: tensor}}."""
        lid = int(self._records[r, 3])
        if lid < 0:
            return {}
        layout = self._state_layout(lid)
        flat = unpack(layout, {p: self._read_row(f"state/{lid}/{p}", r) for p in pack_sizes(layout)})
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in flat.items():
            pname, _, key = name.rpartition("/")
            out.setdefault(pname, {})[key] = t
        return out

    def _state_layout(self, lid: int) -> list[Slot]:
        if lid >= len(self.state_layouts):
            raise TrajscopeError(f"{self.path}: optimizer-state layout {lid} is not described; the store is damaged")
        return self.state_layouts[lid]

    def hparams(self, r: int) -> list[dict[str, Any]]:
        values = self._read_row("hparams", r)
        names = self.attrs["hparam_names"]
        return [restore_hparams(names, values[g], self.attrs.get("hparam_bools", [])) for g in range(values.shape[0])]

    def batch(self, r: int) -> Any | None:
        meta = self.attrs.get("batch")
        if meta is None:
            return None
        if self._records[r, 2] < 0:
            return None  # Recorder.batch() was not called for this step
        leaves = self._batch_leaves(r)
        if self.shards is not None:
            leaves = self.shards.join(self.path, self._step(r), meta, leaves)
        return unflatten_batch(meta["spec"], leaves)

    def missing_shards(self) -> dict[int, np.ndarray]:
        """Distributed runs: per rank k > 0, the recorded steps without rank k's batch shard (steps whose
        batch cannot be read: :meth:`batch` raises DamagedRecordError for them). Empty otherwise."""
        return {} if self.shards is None else self.shards.missing(self.steps)

    def _batch_leaves(self, r: int) -> dict[str, torch.Tensor]:
        """Record r's batch leaves as recorded by this store's own process."""
        return {
            key: _from_numpy(self._read_row(f"batch/{key}", r, self._batch_shape(key, r)), dt)
            for key, dt in self.attrs["batch"]["dtypes"].items()
        }

    def forward(self, r: int) -> list[ForwardState] | None:
        """The forward state of record r's micro-batches (see :class:`ForwardState`); None where the
        run did not record one (recorded before trajscope recorded it, or before ``forward_from``),
        ``[]`` where the record has none (no forward pass of the module was seen for its batch).
        Distributed runs: rank 0's micro-batches, then those of ranks 1 .. W-1, as :meth:`batch` joins
        their rows (each rank drew its dropout masks from its own generator); ``[]`` unless every rank
        recorded its forward state for the step."""
        own = self._own_forward(r)
        return own if self.shards is None or not own else self.shards.forward(self._step(r), own)

    def _own_forward(self, r: int) -> list[ForwardState] | None:
        """Record r's forward state as recorded by this store's own process."""
        start = self.attrs.get("forward_from")
        if start is None or r < int(start):
            return None
        m = int(self._read_row("forward/count", r))
        if m == 0:
            return []
        micro = self._read_row("forward/micro", r, (m, 3))
        cpu = self._read_row("forward/rng_cpu", r, (m, self._row_layout_checked("forward/rng_cpu", r)[2]))
        cuda = None
        if bool((micro[:, 2] >= 0).any()):
            cuda = self._read_row("forward/rng_cuda", r, (m, self._row_layout_checked("forward/rng_cuda", r)[2]))
        modes = self.attrs.get("forward_modes", [])
        out = []
        for i, (size, mode, dev) in enumerate(micro.tolist()):
            if not 0 <= mode < len(modes):
                raise self._damaged("forward/micro", r, _Damage(f"forward mode {mode} is not described"))
            out.append(
                ForwardState(
                    size=int(size),
                    training=bool(modes[mode]["training"]),
                    differ=tuple(modes[mode]["differ"]),
                    rng_cpu=torch.from_numpy(cpu[i].copy()),
                    rng_cuda=None if dev < 0 else torch.from_numpy(cuda[i].copy()),
                    cuda_device=None if dev < 0 else int(dev),
                )
            )
        return out

    def _row_layout_checked(self, name: str, r: int) -> tuple[int, ...]:
        """The current shape of a per-record array (DamagedRecordError naming row r's step if unreadable)."""
        try:
            return self._row_layout(name)[1]
        except _Damage as d:
            raise self._damaged(name, r, d) from None

    def _batch_shape(self, key: str, r: int) -> np.ndarray | None:
        """Record r's own shape of batch leaf ``key`` (None for a 0-d leaf: it has no batch_shape)."""
        try:
            ndim = len(self._row_layout(f"batch/{key}")[1]) - 1
        except _Damage as d:
            raise self._damaged(f"batch/{key}", r, d) from None
        return self._read_row(f"batch_shape/{key}", r) if ndim else None

    def probe(self) -> Any | None:
        meta = self.attrs.get("probe")
        if meta is None:
            return None
        leaves = {k: _from_numpy(self._probe_leaf(k), dt) for k, dt in meta["dtypes"].items()}
        return unflatten_batch(meta["spec"], leaves)

    def _probe_leaf(self, key: str, read: bool = True) -> np.ndarray | None:
        try:
            return _twice(lambda: _whole_array(self.path, f"probe/{key}", self.checksums, read))
        except _Damage as d:
            raise self._damaged(f"probe/{key}", None, d) from None

    def extra_path(self, name: str) -> Path:
        return self.path / "extra" / name

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # -- integrity -------------------------------------------------------------------------------
    def record_arrays(self) -> list[tuple[str, np.ndarray]]:
        """Every per-record array the committed records wrote to, with the rows that wrote it, in
        the order a record writes them (``records`` and ``skipped`` are read whole at open)."""
        every = np.arange(self.n_records)
        out = [(f"params/{p}", every) for p in pack_sizes(self.param_layout)]
        out += [(f"buffers/{p}", every) for p in pack_sizes(self.buffer_layout)]
        lids = self._records[:, 3].astype(np.int64)
        for lid in np.unique(lids[lids >= 0]).tolist():
            out += [(f"state/{lid}/{p}", np.nonzero(lids == lid)[0]) for p in pack_sizes(self._state_layout(lid))]
        meta = self.attrs.get("batch")
        if meta is not None:
            with_batch = np.nonzero(self._records[:, 2] >= 0)[0]
            out += [(f"batch/{key}", with_batch) for key in meta["dtypes"]]
        start = self.attrs.get("forward_from")
        if start is not None and int(start) < self.n_records:
            out.append(("forward/count", np.arange(int(start), self.n_records)))
        if "shard" not in self.attrs:  # a rank's batch shards: rank 0 records the hyperparameters
            out.append(("hparams", every))
        if "grad_norms" in self.attrs:
            out.append(("grad_norms", every))
        return out

    def check_structure(self) -> None:
        """Check the files without reading the records: every array document the committed records
        need is present and parseable, and every shard file they were written to is present, holds
        an index whose checksum matches and entries for those records, and is as long as they say.
        One ``stat`` and one small ``pread`` per shard file (plus each record's batch shape, a few
        bytes). Raises DamagedRecordError: for an array document, naming no step; else for the
        earliest damaged record."""
        first: _Damage | None = None
        for name, rows in self.record_arrays():
            if not len(rows):
                continue
            try:
                found = self._check_shards(name, self._extent_groups(name, rows))
            except _Damage as d:
                if d.row is None:  # an array document: every record of the array is affected
                    raise self._damaged(d.array or name, None, d) from None
                found = d
            if found is not None and (first is None or found.row < first.row):
                found.array = found.array or name
                first = found
        if first is not None:
            raise self._damaged(first.array, first.row, first)
        for key in (self.attrs.get("probe") or {}).get("dtypes", {}):
            self._probe_leaf(key, read=False)
        for shard in self.shards.stores(self.path) if self.shards is not None else ():
            shard.check_structure()

    def _extent_groups(self, name: str, rows: np.ndarray) -> list[tuple[list[int], np.ndarray]]:
        """(row extents, rows with those extents) for rows of a per-record array: the whole row, or
        for a batch leaf each record's own shape (its batch_shape rows, each shard file read once)."""
        lay, full = self._row_layout(name)
        if not (name.startswith("batch/") and len(full) > 1):
            return [(list(full[1:]), rows)]
        shape_name = f"batch_shape/{name[len('batch/') :]}"
        try:
            shapes = _shard_rows(self.path, shape_name, rows, self.checksums)
        except _Damage as d:
            d.array = shape_name
            raise
        uniq, inverse = np.unique(shapes.reshape(len(rows), -1), axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        return [([min(int(e), n) for e, n in zip(u, full[1:])], rows[inverse == i]) for i, u in enumerate(uniq)]

    def _check_shards(self, name: str, groups: list[tuple[list[int], np.ndarray]]) -> _Damage | None:
        """The earliest damage in the shard files that ``groups`` of rows were written to, if any."""
        lay = self._row_layout(name)[0]
        by_column: dict[tuple[int, ...], list[np.ndarray]] = {}
        for extents, rows in groups:
            for g in lay.columns(extents):
                by_column.setdefault(g, []).append(rows)
        first: _Damage | None = None
        for g, parts in by_column.items():
            rows = np.unique(np.concatenate(parts))
            shards = rows // lay.rows
            for s in np.unique(shards).tolist():
                in_shard = rows[shards == s]
                if first is not None and in_shard[0] >= first.row:
                    break
                try:
                    _twice(lambda: _check_shard(self.path / name, lay, in_shard, g))
                except _Damage as d:
                    first = d if first is None or d.row < first.row else first
                    break
        return first

    def verify_records(self, progress: Callable[[int], None] | None = None) -> int:
        """Read every committed record of every array (and the probe), checking every checksum, in
        record order; returns the bytes read. Raises DamagedRecordError for the first damaged record
        (``records`` and ``skipped`` were checked at open). ``progress(records done)`` after each."""
        arrays = []
        for name, rows in self.record_arrays():
            mask = np.zeros(self.n_records, bool)
            mask[rows] = True
            arrays.append((name, mask))
        nbytes = sum(
            self._whole_bytes(name, n) for name, n in (("records", self.n_records), ("skipped", len(self.skipped))) if n
        )
        for r in range(self.n_records):
            for name, mask in arrays:
                if not mask[r]:
                    continue
                shape = None
                if name.startswith("batch/"):
                    key = name[len("batch/") :]
                    shape = self._batch_shape(key, r)
                    if shape is not None:
                        nbytes += self._row_bytes(f"batch_shape/{key}", None)
                self._read_row(name, r, shape)
                nbytes += self._row_bytes(name, shape)
            if progress is not None:
                progress(r + 1)
        for key in (self.attrs.get("probe") or {}).get("dtypes", {}):
            nbytes += self._probe_leaf(key).nbytes
        for shard in self.shards.stores(self.path) if self.shards is not None else ():
            nbytes += shard.verify_records()
        return nbytes

    def _row_bytes(self, name: str, shape: Sequence[int] | None) -> int:
        lay, extents = self._row_extents(name, shape)
        return len(lay.columns(extents)) * lay.chunk_bytes

    def _whole_bytes(self, name: str, n: int) -> int:
        return n * self._row_layout(name)[0].chunk_bytes


def _open_root(path: Path, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False)
    except Exception as e:
        raise TrajscopeError(f"{path} cannot be opened as a Zarr v3 store ({type(e).__name__}: {e})") from None


def _ranges(steps: np.ndarray) -> str:
    if not len(steps):
        return "none"
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)} steps)"
