"""The write side of the ``trajectory.zarr`` format (:mod:`trajscope.io.layout`): records appended
row by row into shard files, made visible by the atomic commit marker.

Just over 400 lines: one class, the writer, whose append/commit/resume steps share its state."""

from __future__ import annotations

import json
import shutil
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from trajscope.errors import TrajscopeError
from trajscope.io import files
from trajscope.io.documents import _commit_attrs, _jsonable, _read_group_attrs
from trajscope.io.files import _atomic_write, _remove_partials, _write_group
from trajscope.io.layout import (
    _CAPACITY_BLOCK,
    _EMPTY,
    CHECKSUM_VERSION,
    FORMAT,
    FORMAT_VERSION,
    GRAD_NORM_COLUMNS,
    STORE_NAME,
    _plain_array_doc,
    _row_array_doc,
    _version,
)
from trajscope.io.packing import Slot, _float, _to_numpy, flatten_batch, storage_dtype
from trajscope.io.records import ForwardState, Snapshot
from trajscope.io.shards import _crc32c, _Damage, _leading_rows, _row_shards, _RowShards, _shard_path

_MAX_OPEN = 32  # shard files kept open by a writer (least recently used closed first)


class TrajectoryWriter:
    """Appends records to ``RUN/trajectory.zarr``. Not thread-safe: one writer thread owns it."""

    def __init__(
        self,
        run_dir: str | Path,
        meta: Mapping[str, Any] | None = None,
        *,
        resume: bool = False,
        restart_step: int | None = None,
        name: str = STORE_NAME,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        exists = (self.path / "zarr.json").exists()
        if exists and resume:
            # a resumed store keeps its format version (a version 2 store goes on without checksums)
            self.checksums = _version(_read_group_attrs(self.path), self.path) >= CHECKSUM_VERSION
            _remove_partials(self.path)
            self._commit = _commit_attrs(self.path)
            if restart_step is not None:
                self._truncate_from(restart_step)
        else:
            if meta is None:
                raise TrajscopeError(f"{self.path} does not exist: nothing to resume")
            self._create(meta)
            self._commit = _commit_attrs(self.path)
            self.checksums = True
        self.attrs = _read_group_attrs(self.path)
        self.records = int(self._commit["records"])
        self.n_skipped = int(self._commit["skipped"])
        self._written_last_step = self._commit.get("last_step")
        self._arrays: dict[str, dict[str, Any]] = {}  # name -> its zarr.json document
        self._layouts: dict[str, _RowShards] = {}
        # per (array, chunk column): (shard number, open file, its index as written)
        self._files: dict[tuple[str, tuple[int, ...]], tuple[int, Any, np.ndarray]] = {}
        self._state_layouts = [[Slot.from_json(s) for s in lay] for lay in self.attrs.get("state_layouts", [])]

    def _create(self, meta: Mapping[str, Any]) -> None:
        """The empty store (root attributes ``meta`` + commit marker), built under a temporary name and
        renamed into place, so a process killed during creation never leaves a half-made store that
        looks like a run but cannot be opened (an existing store at the path is replaced)."""
        name = self.path.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stray in self.run_dir.glob(f".{name}.*.partial"):
            shutil.rmtree(stray, ignore_errors=True)
        tmp = self.run_dir / f".{name}.{uuid.uuid4().hex}.partial"
        (tmp / "commit").mkdir(parents=True)
        _write_group(
            tmp,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created": time.time(),
                **meta,
                "state_layouts": [],
                "grad_norms": list(GRAD_NORM_COLUMNS),
            },
        )
        _write_group(tmp / "commit", {"records": 0, "last_step": None, "skipped": 0, "restarts": []})
        if self.path.exists():  # overwrite=True
            shutil.rmtree(self.path)
        files.rename(tmp, self.path)

    @property
    def last_step(self) -> int | None:
        return self._commit.get("last_step")

    def _write_commit(self, **changes: Any) -> None:
        """Rewrite the commit marker ``commit/zarr.json`` atomically (see :func:`_write_group`)."""
        new = {**self._commit, **changes}
        _write_group(self.path / "commit", new)
        self._commit = new

    # -- arrays --------------------------------------------------------------------------------
    def _array(self, name: str, inner: tuple[int, ...], dtype: np.dtype, rows: int) -> _RowShards:
        """Layout of the array ``name``, created or grown to hold ``rows`` rows (capacity grows in
        blocks) and at least ``inner`` along the other axes.

        The ``zarr.json`` documents are written here, atomically, rather than through
        ``Group.create_array`` / ``Array.resize``: zarr's event-loop round trips cost ~3 ms per
        array while training kept both cores busy."""
        doc = self._arrays.get(name)
        if doc is None:
            path = self.path / name / "zarr.json"
            if path.exists():
                doc = json.loads(path.read_text())
            else:
                doc = _row_array_doc((max(_CAPACITY_BLOCK, rows), *inner), dtype, self.checksums)
                self._write_doc(name, doc)
            try:
                self._layouts[name] = _row_shards(doc, self.checksums)
            except _Damage as d:
                raise TrajscopeError(f"{self.path}/{name}: {d}; the store is damaged") from None
            self._arrays[name] = doc
        shape = doc["shape"]
        if shape[0] < rows or any(a < b for a, b in zip(shape[1:], inner)):
            new0 = max(shape[0], ((rows + _CAPACITY_BLOCK - 1) // _CAPACITY_BLOCK) * _CAPACITY_BLOCK)
            doc["shape"] = [new0, *[max(a, b) for a, b in zip(shape[1:], inner)]]
            self._write_doc(name, doc)
        return self._layouts[name]

    def _write_doc(self, name: str, doc: Mapping[str, Any]) -> None:
        """Write an array's ``zarr.json`` atomically (and the group documents above it)."""
        folder = self.path / name
        folder.mkdir(parents=True, exist_ok=True)
        for parent in reversed(folder.relative_to(self.path).parents[:-1]):
            if not (self.path / parent / "zarr.json").exists():
                _write_group(self.path / parent, {})
        _atomic_write(folder / "zarr.json", json.dumps(doc, indent=2).encode())

    def _shard_file(self, name: str, lay: _RowShards, r: int, g: tuple[int, ...]) -> tuple[int, np.ndarray]:
        """The descriptor of the open shard file holding row ``r`` of chunk column ``g`` and its index
        as written (a new file is created with an empty index under a temporary name: every shard
        file on disk is decodable; an existing one must have an index this writer could have written)."""
        held = self._files.pop((name, g), None)
        if held is not None and held[0] == r // lay.rows:
            self._files[(name, g)] = held  # most recently used last
            return held[1].fileno(), held[2]
        if held is not None:
            held[1].close()
        while len(self._files) >= _MAX_OPEN:  # e.g. a batch array grown to many chunk columns
            self._files.pop(next(iter(self._files)))[1].close()
        path = _shard_path(self.path / name, lay, r, g)
        if not path.exists():
            idx = lay.empty_index()
            f = files.new_file(path, lay.encode_index(idx))
        else:
            f = open(path, "r+b", buffering=0)
            try:
                idx = self._check_index(path, lay, files.pread(f.fileno(), lay.index_bytes, 0))
            except BaseException:
                f.close()
                raise
        self._files[(name, g)] = (r // lay.rows, f, idx)
        return f.fileno(), idx

    @staticmethod
    def _check_index(path: Path, lay: _RowShards, data: bytes) -> np.ndarray:
        """A writable copy of an existing shard's index, which must be one this writer wrote: every
        entry empty or at its row's fixed place, and its checksum right."""
        try:
            idx = np.array(lay.decode_index(data, path.name))
        except _Damage as d:
            raise TrajscopeError(f"{path.parent}: {d}; the store is damaged") from None
        expected = lay.index_bytes + np.arange(lay.rows, dtype=np.uint64) * np.uint64(lay.chunk_bytes)
        if not bool(np.all((idx[:, 0] == _EMPTY) | ((idx[:, 0] == expected) & (idx[:, 1] == lay.chunk_bytes)))):
            raise TrajscopeError(
                f"{path}: shard index does not match format version "
                f"{CHECKSUM_VERSION if lay.checksums else 2}; the store is damaged"
            )
        return idx

    def _write_row(self, name: str, r: int, data: np.ndarray) -> None:
        """Write ``data`` as row ``r`` of array ``name``: each chunk (values, then their CRC32C) at
        its fixed place in its shard file, then the shard's index.

        Written here rather than with ``Array.__setitem__``: zarr would read, decode and rewrite the
        whole shard for each row (and its generic path cost ~6.5 ms per record of a 2.6 MiB model
        even unsharded, against ~1 ms for the same bytes). The files are exactly what zarr reads
        (``sharding_indexed`` with bytes and crc32c codecs, edge chunks padded with the fill value 0).
        A plain write is enough for crash safety: only rows below the commit marker are valid, and
        the marker is replaced atomically after every chunk of the row is written.
        """
        lay = self._array(name, data.shape, data.dtype, r + 1)
        data = np.asarray(data, dtype=lay.dtype, order="C")  # (ascontiguousarray would make 0-d rows 1-d)
        for g in lay.columns(data.shape):
            block = data[tuple(slice(j * c, (j + 1) * c) for j, c in zip(g, lay.inner))]
            if block.shape != lay.inner:
                full = np.zeros(lay.inner, dtype=lay.dtype)
                full[tuple(slice(0, n) for n in block.shape)] = block
                block = full
            fd, idx = self._shard_file(name, lay, r, g)
            off = lay.offset(r)
            block = np.ascontiguousarray(block)
            crc = _crc32c(block) if lay.checksums else b""
            files.write_chunk(fd, memoryview(block).cast("B"), crc, off)
            self._write_entry(fd, lay, idx, r, off)

    @staticmethod
    def _write_entry(fd: int, lay: _RowShards, idx: np.ndarray, r: int, off: int) -> None:
        """Point the index entry of row r at its chunk. With checksums the whole index and its CRC
        are rewritten in one write (1028 bytes, inside the file's first page, which a killed process
        completes or leaves untouched); without, the one 16-byte entry."""
        idx[r % lay.rows] = (off, lay.chunk_bytes)
        if lay.checksums:
            files.pwrite(fd, lay.encode_index(idx), 0)
        else:
            files.pwrite(fd, struct.pack("<QQ", off, lay.chunk_bytes), 16 * (r % lay.rows))

    def close(self) -> None:
        """Close the open shard files (commit first to make written records visible)."""
        for _, f, _ in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        self._files.clear()

    def _state_layout_id(self, layout: list[Slot] | None) -> int:
        if layout is None:
            return -1
        for i, existing in enumerate(self._state_layouts):
            if existing == layout:
                return i
        self._state_layouts.append(layout)
        # The new layout is described before any row that uses it can be committed.
        self.set_attrs(state_layouts=[[s.to_json() for s in lay] for lay in self._state_layouts])
        return len(self._state_layouts) - 1

    def set_attrs(self, **attrs: Any) -> None:
        """Update the root attributes (one atomic rewrite of the root group document)."""
        self.attrs.update(_jsonable(attrs))
        _write_group(self.path, self.attrs)

    def write_probe(self, probe: Any) -> None:
        spec, leaves = flatten_batch(probe, "probe")
        shutil.rmtree(self.path / "probe", ignore_errors=True)  # a resumed run's new probe replaces it
        for key, t in leaves:
            data = _to_numpy(t.detach().to("cpu").contiguous())
            data = data.astype(data.dtype.newbyteorder("<"), copy=False)  # tobytes() is C order
            name = f"probe/{key}"
            raw = data.tobytes()
            crc = google_crc32c.value(raw) if self.checksums and data.size else None
            self._write_doc(name, _plain_array_doc(data.shape, data.dtype, crc))
            if data.size:  # an empty array has no chunk
                _atomic_write(self.path / name / ".".join(["c"] + ["0"] * data.ndim), raw)
        self.set_attrs(probe={"spec": spec, "dtypes": {k: storage_dtype(t.dtype)[0] for k, t in leaves}})

    def extra_path(self, name: str) -> Path:
        p = self.path / "extra"
        p.mkdir(exist_ok=True)
        return p / name

    # -- records ---------------------------------------------------------------------------------
    def append(self, snap: Snapshot, commit: bool = True) -> None:
        """Write one record, then (unless ``commit=False``: see :meth:`commit`) advance the commit
        marker, the only thing that makes it visible."""
        r = self.records
        rows = r + 1
        layout_id = self._state_layout_id(snap.state_layout)
        # -1: the record has no batch (Recorder.batch() was not called for its step)
        batch_size = (snap.batch[0][1].shape[0] if snap.batch[0][1].dim() > 0 else 0) if snap.batch else -1
        for prefix, packs in (("params", snap.params), ("buffers", snap.buffers)):
            for pname, flat in packs.items():
                self._write_row(f"{prefix}/{pname}", r, _to_numpy(flat))
        for pname, flat in snap.state.items():
            self._write_row(f"state/{layout_id}/{pname}", r, _to_numpy(flat))
        if snap.batch_spec is not None and "batch" in self.attrs:
            now = {"spec": _jsonable(snap.batch_spec), "dtypes": {k: storage_dtype(t.dtype)[0] for k, t in snap.batch}}
            if now != self.attrs["batch"]:
                raise TrajscopeError(
                    "the batch structure changed during the run (leaves or dtypes); record it to a new folder"
                )
        for key, t in snap.batch:
            leaf = _to_numpy(t.contiguous())
            self._write_row(f"batch/{key}", r, leaf)
            if leaf.ndim:  # leaves are stored padded to the largest shape seen: keep each one's own
                self._write_row(f"batch_shape/{key}", r, np.array(leaf.shape, dtype=np.int64))
        self._write_forward(r, snap.forward)
        if snap.hparams is not None:
            self._write_row("hparams", r, np.asarray(snap.hparams, dtype=np.float64))
        if "grad_norms" in self.attrs:  # a store resumed from before the column goes on without it
            self._write_row("grad_norms", r, np.array([_float(v) for v in snap.grad_norms], dtype=np.float64))
        self._write_row("records", r, np.array([snap.step, snap.loss, batch_size, layout_id], dtype=np.float64))
        if snap.batch_spec is not None and "batch" not in self.attrs:
            self.set_attrs(
                batch={"spec": snap.batch_spec, "dtypes": {k: storage_dtype(t.dtype)[0] for k, t in snap.batch}}
            )
        self.records = rows
        self._written_last_step = int(snap.step)
        if commit:
            self.commit()

    def _write_forward(self, r: int, forward: Sequence[ForwardState]) -> None:
        """The forward state of record r's micro-batches (``forward/*``). Written from the first record
        that has one on (its row is the root attribute ``forward_from``; runs recorded before, or rows
        before it in a resumed run, have none): from there every record writes ``forward/count``."""
        if "forward_from" not in self.attrs:
            if not forward:
                return
            self.set_attrs(forward_from=r)  # described before any row that uses it is committed
        self._write_row("forward/count", r, np.array(len(forward), dtype=np.int64))
        if not forward:
            return
        modes = self.attrs.get("forward_modes", [])
        ids = []
        for fs in forward:
            m = _jsonable(fs.mode)
            if m not in modes:
                modes = [*modes, m]
                self.set_attrs(forward_modes=modes)
            ids.append(modes.index(m))
        self._write_row(
            "forward/micro",
            r,
            np.array(
                [[fs.size, i, -1 if fs.cuda_device is None else fs.cuda_device] for fs, i in zip(forward, ids)],
                np.int64,
            ),
        )
        self._write_row("forward/rng_cpu", r, np.stack([fs.rng_cpu.numpy() for fs in forward]))
        cuda = [fs.rng_cuda for fs in forward]
        if any(t is not None for t in cuda):
            n = max(t.numel() for t in cuda if t is not None)
            rows = np.zeros((len(cuda), n), np.uint8)
            for i, t in enumerate(cuda):
                if t is not None:
                    rows[i, : t.numel()] = t.numpy()
            self._write_row("forward/rng_cuda", r, rows)

    def skip(self, step: int, commit: bool = True) -> None:
        n = self.n_skipped
        self._write_row("skipped", n, np.array(step, dtype=np.int64))
        self.n_skipped = n + 1
        if commit:
            self.commit()

    @property
    def uncommitted(self) -> bool:
        """Whether records or skips were written that the commit marker does not cover yet."""
        return self.records != self._commit["records"] or self.n_skipped != self._commit["skipped"]

    def commit(self) -> None:
        """Make every record and skip written so far valid: one atomic write of the marker.

        A writer may append several records and commit once (the marker costs a file creation and a
        rename, ~1-2 ms on a busy disk); a kill then loses the uncommitted ones, which were never
        visible.
        """
        changes: dict[str, Any] = {}
        if self._commit["records"] != self.records:
            changes.update(records=self.records, last_step=self._written_last_step)
        if self._commit["skipped"] != self.n_skipped:
            changes["skipped"] = self.n_skipped
        if changes:
            self._write_commit(**changes)

    def _truncate_from(self, step: int) -> None:
        """Training restarted at ``step``: records at or after it become invalid; note the restart."""
        n = int(self._commit["records"])
        steps = (
            _leading_rows(self.path, "records", n, self.checksums)[:, 0].astype(np.int64)
            if n
            else np.zeros(0, np.int64)
        )
        keep = int(np.searchsorted(steps, step, side="left"))
        sk_n = int(self._commit["skipped"])
        sk = (
            _leading_rows(self.path, "skipped", sk_n, self.checksums).astype(np.int64)
            if sk_n
            else np.zeros(0, np.int64)
        )
        keep_sk = int(np.sum(sk < step))
        if keep == n and keep_sk == sk_n:
            return
        restarts = list(self._commit.get("restarts", []))
        restarts.append({"at_step": int(step), "dropped_records": n - keep, "time": time.time()})
        last = int(steps[keep - 1]) if keep else None
        self.attrs = getattr(self, "attrs", None) or _read_group_attrs(self.path)  # (called from __init__ too)
        if int(self.attrs.get("forward_from", -1)) > keep:  # the rows rewritten from keep on write forward/count
            self.set_attrs(forward_from=keep)
        self._write_commit(records=keep, last_step=last, skipped=keep_sk, restarts=restarts)
        self.records, self.n_skipped, self._written_last_step = keep, keep_sk, last
