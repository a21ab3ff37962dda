"""The ``trajectory.zarr`` run format: the one module that writes and reads it.

Layout (Zarr v3, root group attributes hold the static description)::

    trajectory.zarr/
      zarr.json                 attrs: format, format_version, cadence, parameter/buffer layouts,
                                optimizer class and groups, hparam names, batch structure,
                                model and loss capture, optimizer-state layouts
      commit/zarr.json          attrs: records (valid rows), last_step, skipped, restarts  <- commit marker
      records       (R, 4)  float64   step, loss, batch size (-1: no batch), optimizer-state layout id (-1: none)
      hparams       (R, G, H) float64 per-group numeric hyperparameters in force for the update
      params/<pack> (R, n)            every parameter, flattened and packed per storage dtype
      buffers/<pack>(R, n)            every buffer, likewise
      state/<id>/<pack> (R, n)        optimizer state (momentum, exp_avg, exp_avg_sq, step, ...)
      batch/<leaf>  (R, Bmax, ...)    the mini-batch leaves, padded to the largest shape seen
      batch_shape/<leaf> (R, ndim) int64  each record's own shape of the leaf
      skipped       (S,)    int64     steps the recorder had to skip (writer behind, policy "skip")
      probe/<leaf>                    optional fixed probe batch (stored once)
      extra/model.pt2                 optional ``torch.export`` program (loading it needs trust)

Every per-record array is sharded along its rows (Zarr v3 ``sharding_indexed``): a shard file
``c.<s>.<j>`` holds rows ``64 s .. 64 s + 63`` (uncompressed, row i of the shard at a fixed offset
after a 16-byte-per-row index at the start of the file), so a record writes into files that are
already open instead of creating one file per array and row. Row r is valid iff
``r < commit.records``: the commit marker is replaced atomically only after every chunk of the
row and its index entry are written. Capacity grows in blocks so metadata is rarely rewritten.
Small tensors are packed into one flat array per storage dtype so a small model costs a handful
of chunk writes per step. bfloat16 has no Zarr dtype: it is stored as
its uint16 bit pattern (pack name ``bfloat16``) and viewed back, so it round-trips bit-exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import zarr

from trajscope.errors import TrajscopeError

FORMAT = "trajscope-trajectory"
FORMAT_VERSION = 2         # 2: per-record arrays sharded by rows (1: one chunk file per row)
STORE_NAME = "trajectory.zarr"
_CAPACITY_BLOCK = 64
_SHARD_ROWS = _CAPACITY_BLOCK     # rows per shard file
_MAX_CHUNK_ELEMS = 1 << 22  # 4 Mi elements per chunk along a packed row
_EMPTY = 2**64 - 1          # shard index entry of a chunk that was never written
# No compression. Weights barely compress: Blosc lz4 + bitshuffle saved 12% of the bytes of a
# 784-512-512-10 MLP but doubled the writer's CPU per record (3.9 vs 1.9 ms for 2.9 MiB), and on a
# small machine that CPU is taken from the training thread (benchmarks/bench_recorder.py). Without it
# every row of an array has the same size, so its place in a shard file is fixed.
#
# Why shards: creating a file cost ~0.8 ms on this VM's ext4 while the recorder streamed data
# (journal commits wait for the data written before them); one chunk file per array and row made a
# record of the reference MLP open 6 files (~4.6 ms) where ``torch.save`` opens 1.
# Chunk (and shard) files are named ``c.<row>.<j>`` inside the array's folder, not ``c/<row>/<j>``
# (one directory per row and array).
_CHUNK_KEYS = {"name": "default", "configuration": {"separator": "."}}
_WRITE_PIECE = 1 << 20
_MAX_OPEN = 32   # shard files kept open by a writer (least recently used closed first)
RECORD_COLUMNS = ("step", "loss", "batch_size", "state_layout")


# --------------------------------------------------------------------------- dtypes and packing
def storage_dtype(dtype: torch.dtype) -> tuple[str, np.dtype]:
    """(pack name, numpy storage dtype) for a torch dtype; bf16 keeps its bit pattern as uint16."""
    if dtype == torch.bfloat16:
        return "bfloat16", np.dtype("uint16")
    if dtype == torch.bool:
        return "bool", np.dtype("bool")
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return np_dtype.name, np_dtype


def torch_dtype(name: str) -> torch.dtype:
    if name == "bfloat16":
        return torch.bfloat16
    if name == "bool":
        return torch.bool
    return torch.from_numpy(np.empty(0, dtype=name)).dtype


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one tensor lives inside a packed row."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pack: str
    offset: int
    numel: int

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.pack, self.offset, self.numel]

    @classmethod
    def from_json(cls, j: Sequence) -> "Slot":
        return cls(j[0], j[1], tuple(j[2]), j[3], j[4], j[5])


def make_layout(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[Slot]:
    """Assign every tensor a slot in the pack of its storage dtype, in the given order."""
    offsets: dict[str, int] = {}
    slots = []
    for name, t in tensors:
        pack, _ = storage_dtype(t.dtype)
        off = offsets.get(pack, 0)
        slots.append(Slot(name, pack, tuple(t.shape), pack, off, t.numel()))
        offsets[pack] = off + t.numel()
    return slots


def pack_sizes(layout: Sequence[Slot]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for s in layout:
        sizes[s.pack] = max(sizes.get(s.pack, 0), s.offset + s.numel)
    return sizes


def pack(layout: Sequence[Slot], tensors: Sequence[torch.Tensor],
         alloc: Any = None) -> dict[str, torch.Tensor]:
    """Concatenate tensors (in layout order) into one flat CPU tensor per pack: one copy, detached.

    The copy is what isolates the snapshot from the optimizer's in-place update that follows.
    ``alloc(shape, dtype)`` may hand out a reusable CPU buffer to copy into (or None).
    """
    by_pack: dict[str, list[torch.Tensor]] = {}
    for slot, t in zip(layout, tensors):
        by_pack.setdefault(slot.pack, []).append(t.detach().reshape(-1))
    out = {}
    for name, parts in by_pack.items():
        buf = alloc((sum(p.numel() for p in parts),), parts[0].dtype) if alloc is not None else None
        if buf is not None:
            if len(parts) > 1 and parts[0].device.type == "cpu":
                torch.cat(parts, out=buf)
            else:
                buf.copy_(torch.cat(parts) if len(parts) > 1 else parts[0])
            out[name] = buf
            continue
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        out[name] = flat.to("cpu")
    return out


def _to_numpy(flat: torch.Tensor) -> np.ndarray:
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def unpack(layout: Sequence[Slot], rows: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack` for one stored row per pack."""
    out = {}
    for s in layout:
        flat = rows[s.pack][s.offset : s.offset + s.numel]
        if s.pack == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(flat).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(flat))
        out[s.name] = t.reshape(s.shape)
    return out


# --------------------------------------------------------------------------- batch structure
def flatten_batch(obj: Any, prefix: str = "") -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """Structure spec (JSON) and named tensor leaves of a tensor / tuple / list / dict / None tree."""
    leaves: list[tuple[str, torch.Tensor]] = []

    def walk(o: Any, key: str) -> Any:
        if isinstance(o, torch.Tensor):
            leaves.append((key, o))
            return {"t": "tensor", "leaf": key}
        if o is None:
            return {"t": "none"}
        if isinstance(o, (tuple, list)):
            return {"t": type(o).__name__, "items": [walk(v, f"{key}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, Mapping):
            return {"t": "dict", "items": {str(k): walk(v, f"{key}.{_leaf_part(k)}") for k, v in o.items()}}
        if isinstance(o, (int, float, bool)):
            return {"t": "const", "value": o}
        raise TypeError(f"cannot record a batch element of type {type(o).__name__}")

    spec = walk(obj, prefix)
    return spec, leaves


def _leaf_part(k: Any) -> str:
    """A dict key as part of a leaf name, which names an array folder: path separators escaped,
    so that a key like ``"../x"`` cannot write outside the store (the spec keeps the key as is)."""
    return str(k).replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")


def unflatten_batch(spec: Any, leaves: Mapping[str, torch.Tensor]) -> Any:
    t = spec["t"]
    if t == "tensor":
        return leaves[spec["leaf"]]
    if t == "none":
        return None
    if t == "const":
        return spec["value"]
    if t in ("tuple", "list"):
        items = [unflatten_batch(s, leaves) for s in spec["items"]]
        return tuple(items) if t == "tuple" else items
    if t == "dict":
        return {k: unflatten_batch(s, leaves) for k, s in spec["items"].items()}
    raise TrajscopeError(f"unknown batch structure node {t!r}: the store may come from a newer trajscope")


# --------------------------------------------------------------------------- hyperparameters
def numeric_hparams(group: Mapping[str, Any]) -> dict[str, float]:
    """The numeric hyperparameters of a param group, tuples flattened (betas -> betas.0, betas.1)."""
    out: dict[str, float] = {}
    for k, v in group.items():
        if k == "params":
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
            for i, x in enumerate(v):
                out[f"{k}.{i}"] = float(x)
    return out


def restore_hparams(names: Sequence[str], values: np.ndarray, bool_keys: Sequence[str]) -> dict[str, Any]:
    """Inverse of :func:`numeric_hparams` for one group (NaN = absent)."""
    out: dict[str, Any] = {}
    tuples: dict[str, dict[int, float]] = {}
    for name, v in zip(names, values):
        if np.isnan(v):
            continue
        base, _, idx = name.rpartition(".")
        if base and idx.isdigit():
            tuples.setdefault(base, {})[int(idx)] = float(v)
        elif name in bool_keys:
            out[name] = bool(v)
        else:
            out[name] = float(v)
    for base, items in tuples.items():
        out[base] = tuple(items[i] for i in sorted(items))
    return out


# --------------------------------------------------------------------------- writer
@dataclasses.dataclass
class Snapshot:
    """Everything one recorded step writes; tensors are private CPU copies."""

    step: int
    loss: float
    params: dict[str, torch.Tensor]          # pack -> flat
    buffers: dict[str, torch.Tensor]         # pack -> flat
    hparams: np.ndarray                      # (G, H)
    state_layout: list[Slot] | None
    state: dict[str, torch.Tensor]           # pack -> flat
    batch_spec: Any
    batch: list[tuple[str, torch.Tensor]]    # leaves

    @property
    def nbytes(self) -> int:
        tensors = [*self.params.values(), *self.buffers.values(), *self.state.values(), *(t for _, t in self.batch)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _chunks_for(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape of one row of a per-record array (the shard stacks ``_SHARD_ROWS`` of them)."""
    inner = list(shape[1:])
    if len(inner) == 1:
        inner[0] = max(1, min(inner[0], _MAX_CHUNK_ELEMS))
    return (1, *[max(1, int(x)) for x in inner])


@dataclasses.dataclass(frozen=True)
class _RowShards:
    """Where the rows of a per-record array live: row r, chunk column g is at byte
    ``16 S + (r mod S) * chunk_bytes`` of shard file ``c.<r // S>.<g>``, whose index (S pairs of
    little-endian uint64 offset, nbytes; all ones for a chunk never written) opens the file."""

    rows: int                     # S, rows per shard
    inner: tuple[int, ...]        # chunk shape without the row axis
    dtype: np.dtype               # little-endian storage dtype

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.inner) * self.dtype.itemsize

    @property
    def index_bytes(self) -> int:
        return 16 * self.rows

    def offset(self, r: int) -> int:
        return self.index_bytes + (r % self.rows) * self.chunk_bytes

    def columns(self, extents: Sequence[int]) -> list[tuple[int, ...]]:
        """Chunk-grid coordinates (without the row axis) covering ``extents``."""
        grid: list[tuple[int, ...]] = [()]
        for n, c in zip(extents, self.inner):
            grid = [(*g, j) for g in grid for j in range(-(-int(n) // c))]
        return grid

    def index(self, f: Any) -> np.ndarray:
        """The (S, 2) index of an open shard file."""
        idx = self.decode_index(os.pread(f.fileno(), self.index_bytes, 0))
        if idx is None:
            raise OSError("shard file shorter than its index")
        return idx

    def decode_index(self, data: bytes) -> np.ndarray | None:
        """The (S, 2) index at the start of a shard file's bytes; None if they are shorter."""
        if len(data) < self.index_bytes:
            return None
        return np.frombuffer(data, dtype="<u8", count=2 * self.rows).reshape(self.rows, 2)


def _row_shards(doc: Mapping[str, Any], where: Path) -> _RowShards:
    """The row-shard layout of an array from its ``zarr.json`` document, or an error if the array
    is not laid out as this format version writes it."""
    try:
        (codec,) = doc["codecs"]
        cfg = codec["configuration"]
        inner_codecs, index_codecs = cfg["codecs"], cfg["index_codecs"]
        chunk, shard = list(cfg["chunk_shape"]), list(doc["chunk_grid"]["configuration"]["chunk_shape"])
        ok = (codec["name"] == "sharding_indexed" and cfg.get("index_location") == "start"
              and [c["name"] for c in inner_codecs + index_codecs] == ["bytes", "bytes"]
              and all(c.get("configuration", {}).get("endian", "little") == "little" for c in inner_codecs + index_codecs)
              and chunk[0] == 1 and shard[1:] == chunk[1:] and not np.any(doc["fill_value"]))
        dtype = np.dtype(doc["data_type"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise TrajscopeError(f"{where}: not laid out as format version {FORMAT_VERSION} writes it; the store is damaged")
    return _RowShards(rows=int(shard[0]), inner=tuple(int(c) for c in chunk[1:]),
                      dtype=dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)


def _row_array_doc(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    """The ``zarr.json`` of a new per-record array: rows sharded by ``_SHARD_ROWS``, index at the
    start, uncompressed."""
    chunk = _chunks_for(shape)
    return _array_doc(shape, dtype, [_SHARD_ROWS, *chunk[1:]], [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": list(chunk), "codecs": [_bytes_codec(dtype)],
        "index_codecs": [_bytes_codec(np.dtype(np.uint64))], "index_location": "start"}}])


def _plain_array_doc(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    """The ``zarr.json`` of a small array stored as one uncompressed chunk (the probe batch)."""
    return _array_doc(shape, dtype, [max(1, n) for n in shape], [_bytes_codec(dtype)])


def _bytes_codec(dtype: np.dtype) -> dict[str, Any]:
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    return little if np.dtype(dtype).itemsize > 1 else {"name": "bytes"}


def _array_doc(shape: tuple[int, ...], dtype: np.dtype, chunk_shape: list[int], codecs: list) -> dict[str, Any]:
    """Zarr v3 array metadata with fill value 0 (zarr's own classes for it cost ~0.4 ms per
    array on the training thread, and its writes start an event-loop thread and a thread pool
    in the training process; this ~10 us and no thread)."""
    dtype = np.dtype(dtype)
    fill: Any = False if dtype.kind == "b" else [0.0, 0.0] if dtype.kind == "c" else 0.0 if dtype.kind == "f" else 0
    return {"shape": list(shape), "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}},
            "chunk_key_encoding": _CHUNK_KEYS, "fill_value": fill, "codecs": codecs,
            "attributes": {}, "zarr_format": 3, "node_type": "array", "storage_transformers": []}


def _shard_path(base: Path, lay: _RowShards, r: int, g: tuple[int, ...]) -> Path:
    """Shard file of row r, chunk column g (Zarr's default chunk keys with a "." separator)."""
    return base / ".".join(map(str, ("c", r // lay.rows, *g)))


class TrajectoryWriter:
    """Appends records to ``RUN/trajectory.zarr``. Not thread-safe: one writer thread owns it."""

    def __init__(self, run_dir: str | Path, meta: Mapping[str, Any] | None = None, *, resume: bool = False,
                 restart_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STORE_NAME
        exists = (self.path / "zarr.json").exists()
        if exists and resume:
            _check_version(_read_group_attrs(self.path), self.path)
            _remove_partials(self.path)
            self._commit = _commit_attrs(self.path)
            if restart_step is not None:
                self._truncate_from(restart_step)
        else:
            if meta is None:
                raise TrajscopeError(f"{self.path} does not exist: nothing to resume")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Build the empty store (root attributes + commit marker) under a temporary name and rename
            # it into place, so a process killed during creation never leaves a half-made store that
            # looks like a run but cannot be opened.
            for stray in self.run_dir.glob(f".{STORE_NAME}.*.partial"):
                shutil.rmtree(stray, ignore_errors=True)
            tmp = self.run_dir / f".{STORE_NAME}.{uuid.uuid4().hex}.partial"
            (tmp / "commit").mkdir(parents=True)
            _write_group(tmp, {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.time(), **meta,
                               "state_layouts": []})
            _write_group(tmp / "commit", {"records": 0, "last_step": None, "skipped": 0, "restarts": []})
            if self.path.exists():  # overwrite=True
                shutil.rmtree(self.path)
            os.rename(tmp, self.path)
            self._commit = _commit_attrs(self.path)
        self.attrs = _read_group_attrs(self.path)
        self.records = int(self._commit["records"])
        self.n_skipped = int(self._commit["skipped"])
        self._written_last_step = self._commit.get("last_step")
        self._arrays: dict[str, dict[str, Any]] = {}       # name -> its zarr.json document
        self._layouts: dict[str, _RowShards] = {}
        self._files: dict[tuple[str, tuple[int, ...]], tuple[int, Any]] = {}   # (shard, file) per column
        self._state_layouts = [[Slot.from_json(s) for s in lay] for lay in self.attrs.get("state_layouts", [])]

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
                doc = _row_array_doc((max(_CAPACITY_BLOCK, rows), *inner), dtype)
                self._write_doc(name, doc)
            self._layouts[name] = _row_shards(doc, self.path / name)
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

    def _shard_file(self, name: str, lay: _RowShards, r: int, g: tuple[int, ...]) -> int:
        """The descriptor of the open shard file holding row ``r`` of chunk column ``g`` (created,
        with an empty index, under a temporary name: every shard file on disk is decodable)."""
        held = self._files.pop((name, g), None)
        if held is not None and held[0] == r // lay.rows:
            self._files[(name, g)] = held            # most recently used last
            return held[1].fileno()
        if held is not None:
            held[1].close()
        while len(self._files) >= _MAX_OPEN:         # e.g. a batch array grown to many chunk columns
            self._files.pop(next(iter(self._files)))[1].close()
        path = _shard_path(self.path / name, lay, r, g)
        if not path.exists():
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
            f = open(tmp, "w+b", buffering=0)
            try:
                f.write(b"\xff" * lay.index_bytes)
                os.rename(tmp, path)                  # the open file keeps its descriptor
            except BaseException:
                f.close()
                raise
        else:
            f = open(path, "r+b", buffering=0)
            try:
                idx = lay.index(f)
                local = np.arange(lay.rows, dtype=np.uint64)
                expected = lay.index_bytes + local * np.uint64(lay.chunk_bytes)
                if not bool(np.all((idx[:, 0] == _EMPTY) | ((idx[:, 0] == expected) & (idx[:, 1] == lay.chunk_bytes)))):
                    raise TrajscopeError(f"{path}: shard index does not match format version {FORMAT_VERSION}; "
                                         "the store is damaged")
            except BaseException:
                f.close()
                raise
        self._files[(name, g)] = (r // lay.rows, f)
        return f.fileno()

    def _write_row(self, name: str, r: int, data: np.ndarray) -> None:
        """Write ``data`` as row ``r`` of array ``name``: each chunk at its fixed place in its shard
        file, then its index entry.

        Written here rather than with ``Array.__setitem__``: zarr would read, decode and rewrite the
        whole shard for each row (and its generic path cost ~6.5 ms per record of a 2.6 MiB model
        even unsharded, against ~1 ms for the same bytes). The files are exactly what zarr reads
        (``sharding_indexed`` with bytes codecs, edge chunks padded with the fill value 0). A plain
        write is enough for crash safety: only rows below the commit marker are valid, and the
        marker is replaced atomically after every chunk of the row is written.
        """
        lay = self._array(name, data.shape, data.dtype, r + 1)
        data = np.asarray(data, dtype=lay.dtype, order="C")     # (ascontiguousarray would make 0-d rows 1-d)
        for g in lay.columns(data.shape):
            block = data[tuple(slice(j * c, (j + 1) * c) for j, c in zip(g, lay.inner))]
            if block.shape != lay.inner:
                full = np.zeros(lay.inner, dtype=lay.dtype)
                full[tuple(slice(0, n) for n in block.shape)] = block
                block = full
            fd = self._shard_file(name, lay, r, g)
            off = lay.offset(r)
            raw = memoryview(np.ascontiguousarray(block)).cast("B")
            # In pieces: one multi-MiB write() took 3-6x the kernel time of 1 MiB pieces here
            # (2.7 MiB: 2.7-5.7 ms against 0.9 ms on this VM's ext4).
            for start in range(0, len(raw), _WRITE_PIECE):
                piece = raw[start:start + _WRITE_PIECE]
                if os.pwrite(fd, piece, off + start) != len(piece):
                    raise OSError(f"short write to {self.path / name}")
            os.pwrite(fd, struct.pack("<QQ", off, lay.chunk_bytes), 16 * (r % lay.rows))

    def close(self) -> None:
        """Close the open shard files (commit first to make written records visible)."""
        for _, f in self._files.values():
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
            self._write_doc(name, _plain_array_doc(data.shape, data.dtype))
            if data.size:  # an empty array has no chunk
                _atomic_write(self.path / name / ".".join(["c"] + ["0"] * data.ndim), data.tobytes())
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
                raise TrajscopeError("the batch structure changed during the run (leaves or dtypes); "
                                     "record it to a new folder")
        for key, t in snap.batch:
            leaf = _to_numpy(t.contiguous())
            self._write_row(f"batch/{key}", r, leaf)
            if leaf.ndim:   # leaves are stored padded to the largest shape seen: keep each one's own
                self._write_row(f"batch_shape/{key}", r, np.array(leaf.shape, dtype=np.int64))
        self._write_row("hparams", r, np.asarray(snap.hparams, dtype=np.float64))
        self._write_row("records", r, np.array([snap.step, snap.loss, batch_size, layout_id], dtype=np.float64))
        if snap.batch_spec is not None and "batch" not in self.attrs:
            self.set_attrs(batch={"spec": snap.batch_spec,
                                  "dtypes": {k: storage_dtype(t.dtype)[0] for k, t in snap.batch}})
        self.records = rows
        self._written_last_step = int(snap.step)
        if commit:
            self.commit()

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
        steps = _leading_rows(self.path, "records", n)[:, 0].astype(np.int64) if n else np.zeros(0, np.int64)
        keep = int(np.searchsorted(steps, step, side="left"))
        sk_n = int(self._commit["skipped"])
        sk = _leading_rows(self.path, "skipped", sk_n).astype(np.int64) if sk_n else np.zeros(0, np.int64)
        keep_sk = int(np.sum(sk < step))
        if keep == n and keep_sk == sk_n:
            return
        restarts = list(self._commit.get("restarts", []))
        restarts.append({"at_step": int(step), "dropped_records": n - keep, "time": time.time()})
        last = int(steps[keep - 1]) if keep else None
        self._write_commit(records=keep, last_step=last, skipped=keep_sk, restarts=restarts)
        self.records, self.n_skipped, self._written_last_step = keep, keep_sk, last


# --------------------------------------------------------------------------- reader
class TrajectoryReader:
    """Read side of the format: committed rows only."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STORE_NAME
        if not self.run_dir.exists():
            raise TrajscopeError(f"{self.run_dir} does not exist: give the folder a Recorder wrote (it holds {STORE_NAME})")
        if not (self.path / "zarr.json").exists():
            raise TrajscopeError(f"{self.run_dir} is not a trajscope run: no {STORE_NAME} inside; record one with trajscope.Recorder")
        _check_version(_read_group_attrs(self.path), self.path)
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
        self._records = (_leading_rows(self.path, "records", self.n_records) if self.n_records
                         else np.zeros((0, len(RECORD_COLUMNS))))
        n_sk = int(c.get("skipped", 0))
        self.skipped = _leading_rows(self.path, "skipped", n_sk).astype(np.int64) if n_sk else np.zeros(0, np.int64)

    @property
    def root(self) -> zarr.Group:
        """The store through plain zarr, for inspection (the reader's own reads do not use it)."""
        if self._root is None:
            self._root = _open_root(self.path, mode="r")
        return self._root

    def _row_layout(self, name: str) -> tuple[_RowShards, tuple[int, ...]]:
        """Row-shard layout and current shape of a per-record array (its document read once)."""
        if name not in self._layouts:
            doc = _array_meta(self.path, name)
            self._layouts[name] = (_row_shards(doc, self.path / name), tuple(int(n) for n in doc.get("shape", ())))
        return self._layouts[name]

    def _row_extents(self, name: str, shape: Sequence[int] | None) -> tuple[_RowShards, list[int]]:
        """Layout of a per-record array and the extents of a row (its leading ``shape``, if given)."""
        lay, full = self._row_layout(name)
        return lay, [min(int(e), n) for e, n in zip(shape, full[1:])] if shape is not None else list(full[1:])

    def _read_row(self, name: str, r: int, shape: Sequence[int] | None = None) -> np.ndarray:
        """One committed row (its leading ``shape`` only, if given), read straight from the shard
        files the writer filled (one ``pread`` of the index entry and one of the chunk per chunk
        column; Zarr's reader costs ~1 ms per call on top). A chunk that was never written or is
        cut short raises: it would otherwise read back as the fill value."""
        lay, extents = self._row_extents(name, shape)
        out = np.zeros(extents, dtype=lay.dtype.newbyteorder("="))
        for g in lay.columns(extents):
            raw = b""
            try:
                with open(_shard_path(self.path / name, lay, r, g), "rb") as f:
                    off, nbytes = struct.unpack("<QQ", os.pread(f.fileno(), 16, 16 * (r % lay.rows)))
                    if off != _EMPTY and nbytes == lay.chunk_bytes:
                        raw = os.pread(f.fileno(), nbytes, off)
            except (OSError, OverflowError, struct.error):  # OverflowError: a garbage offset
                pass
            if len(raw) != lay.chunk_bytes:
                raise _missing_chunk(self.path, name, r)
            chunk = np.frombuffer(raw, dtype=lay.dtype).reshape(lay.inner)
            dst = tuple(slice(j * c, min((j + 1) * c, e)) for j, c, e in zip(g, lay.inner, extents))
            out[dst] = chunk[tuple(slice(0, d.stop - d.start) for d in dst)]
        return out

    @property
    def steps(self) -> np.ndarray:
        return self._records[:, 0].astype(np.int64)

    @property
    def losses(self) -> np.ndarray:
        return self._records[:, 1]

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
        return unpack(self.buffer_layout, {p: self._read_row(f"buffers/{p}", r) for p in pack_sizes(self.buffer_layout)})

    def state(self, r: int) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state per parameter name: {param: {key: tensor}}."""
        lid = int(self._records[r, 3])
        if lid < 0:
            return {}
        layout = self.state_layouts[lid]
        flat = unpack(layout, {p: self._read_row(f"state/{lid}/{p}", r) for p in pack_sizes(layout)})
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in flat.items():
            pname, _, key = name.rpartition("/")
            out.setdefault(pname, {})[key] = t
        return out

    def hparams(self, r: int) -> list[dict[str, Any]]:
        values = self._read_row("hparams", r)
        names = self.attrs["hparam_names"]
        return [restore_hparams(names, values[g], self.attrs.get("hparam_bools", [])) for g in range(values.shape[0])]

    def batch(self, r: int) -> Any | None:
        meta = self.attrs.get("batch")
        if meta is None:
            return None
        if self._records[r, 2] < 0:
            return None      # Recorder.batch() was not called for this step
        leaves = {}
        for key, dt in meta["dtypes"].items():
            leaf_ndim = len(self._row_layout(f"batch/{key}")[1]) - 1
            shape = self._read_row(f"batch_shape/{key}", r) if leaf_ndim else None
            leaves[key] = _from_numpy(self._read_row(f"batch/{key}", r, shape), dt)
        return unflatten_batch(meta["spec"], leaves)

    def probe(self) -> Any | None:
        meta = self.attrs.get("probe")
        if meta is None:
            return None
        leaves = {k: _from_numpy(_whole_array(self.path, f"probe/{k}"), dt) for k, dt in meta["dtypes"].items()}
        return unflatten_batch(meta["spec"], leaves)

    def extra_path(self, name: str) -> Path:
        return self.path / "extra" / name

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def _from_numpy(a: np.ndarray, dtype_name: str) -> torch.Tensor:
    a = np.asarray(a, order="C")      # not ascontiguousarray: it turns a 0-d leaf into shape (1,)
    if dtype_name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# --------------------------------------------------------------------------- helpers
def _open_root(path: Path, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False)
    except Exception as e:
        raise TrajscopeError(f"{path} cannot be opened as a Zarr v3 store ({type(e).__name__}: {e})") from None


def _check_version(attrs: Mapping[str, Any], path: Path) -> None:
    fmt = attrs.get("format")
    ver = attrs.get("format_version")
    if fmt != FORMAT:
        raise TrajscopeError(f"{path} is not a trajscope trajectory store (format={fmt!r})")
    if ver != FORMAT_VERSION:
        raise TrajscopeError(f"{path} has format version {ver}, this trajscope reads version {FORMAT_VERSION}: "
                             f"use the trajscope release that recorded it")


def _array_meta(store: Path, name: str) -> dict[str, Any]:
    """The ``zarr.json`` document of array ``name``, or the one-line error for a damaged store."""
    try:
        return json.loads((store / name / "zarr.json").read_bytes())
    except FileNotFoundError:
        raise TrajscopeError(f"{store} is missing array {name!r}: the store is truncated or damaged") from None
    except (OSError, ValueError) as e:
        raise TrajscopeError(f"{store}/{name}: cannot read ({type(e).__name__}: {e}); the store is damaged") from None


def _missing_chunk(store: Path, name: str, r: int) -> TrajscopeError:
    return TrajscopeError(f"{store}/{name}: a chunk of record {r} is missing; the store is "
                          f"truncated (re-record, or analyse fewer steps)")


def _leading_rows(store: Path, name: str, n: int) -> np.ndarray:
    """Rows ``0 .. n-1`` of a per-record array whose row is one chunk (``records``, ``skipped``),
    straight from its shard files, each read once (zarr's reads would start an event-loop thread
    and a thread pool, in the training process when a run resumes). A chunk never written or cut
    short raises: it would otherwise read back as the fill value."""
    lay = _row_shards(_array_meta(store, name), store / name)
    out = np.empty((n, *lay.inner), lay.dtype.newbyteorder("="))
    S, g = lay.rows, (0,) * len(lay.inner)
    for first in range(0, n, S):
        try:
            data = _shard_path(store / name, lay, first, g).read_bytes()
        except OSError:
            data = b""
        idx = lay.decode_index(data)
        for r in range(first, min(n, first + S)):
            off, nbytes = (int(v) for v in idx[r - first]) if idx is not None else (_EMPTY, 0)
            if off == _EMPTY or nbytes != lay.chunk_bytes or off + nbytes > len(data):
                raise _missing_chunk(store, name, r)
            out[r] = np.frombuffer(data, lay.dtype, count=math.prod(lay.inner), offset=off).reshape(lay.inner)
    return out


def _whole_array(store: Path, name: str) -> np.ndarray:
    """An array stored as one uncompressed chunk (the probe: :func:`_plain_array_doc`, the same
    layout zarr gave it in earlier versions)."""
    doc = _array_meta(store, name)
    try:
        shape = tuple(int(n) for n in doc["shape"])
        chunk = tuple(int(c) for c in doc["chunk_grid"]["configuration"]["chunk_shape"])
        (codec,) = doc["codecs"]
        dtype = np.dtype(doc["data_type"])
        big = codec.get("configuration", {}).get("endian", "little") == "big"
        ok = codec["name"] == "bytes" and chunk in (shape, tuple(max(1, n) for n in shape))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise TrajscopeError(f"{store}/{name}: not laid out as this trajscope writes it; the store is damaged")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if big else "<")
    if not math.prod(shape):
        return np.zeros(shape, dtype.newbyteorder("="))
    try:
        raw = (store / name / ".".join(["c"] + ["0"] * len(shape))).read_bytes()
    except OSError:
        raw = b""
    if len(raw) != math.prod(chunk) * dtype.itemsize:
        raise TrajscopeError(f"{store}/{name}: its chunk is missing or cut short; the store is damaged")
    a = np.frombuffer(raw, dtype).reshape(chunk)
    if chunk != shape:
        a = a[tuple(slice(0, n) for n in shape)]
    return a.astype(dtype.newbyteorder("="))


def _commit_attrs(path: Path) -> dict[str, Any]:
    """The commit marker's attributes, read from disk now."""
    if not (path / "commit" / "zarr.json").exists():
        raise TrajscopeError(f"{path} has no commit marker: the store is damaged (re-record the run)")
    return _read_group_attrs(path / "commit")


def _read_group_attrs(folder: Path) -> dict[str, Any]:
    """The attributes of the group document ``folder/zarr.json``, read from disk now."""
    try:
        return dict(json.loads((folder / "zarr.json").read_text())["attributes"])
    except (OSError, ValueError, KeyError) as e:
        raise TrajscopeError(f"{folder}: cannot be opened, its zarr.json is unreadable ({type(e).__name__}: {e}); "
                             "the store is damaged") from None


def _write_group(folder: Path, attrs: Mapping[str, Any]) -> None:
    """Write the Zarr v3 group document ``folder/zarr.json`` with ``attrs``, atomically, in one write
    (not through zarr: its event-loop round trips cost ~2.5 ms while training ran, against ~0.1 ms;
    and ``attrs.update`` writes the file once per key, so a kill between two of those writes could
    leave a commit marker whose keys disagree)."""
    doc = {"attributes": _jsonable(attrs), "zarr_format": 3, "node_type": "group"}
    _atomic_write(folder / "zarr.json", json.dumps(doc, indent=2).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a file under a temporary name and rename it into place (readers see old or new)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _remove_partials(path: Path) -> None:
    """LocalStore writes to ``*.partial`` then renames; a killed process can leave strays."""
    for f in path.rglob("*.partial"):
        try:
            f.unlink()
        except OSError:
            pass


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _ranges(steps: np.ndarray) -> str:
    if not len(steps):
        return "none"
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)} steps)"


def is_run(path: str | Path) -> bool:
    return (Path(path) / STORE_NAME / "zarr.json").exists()


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among ``paths`` and, like a TensorBoard logdir, among their sub-folders."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if is_run(p):
            runs.append(p)
        elif p.is_dir():
            runs.extend(sorted(d.parent.parent for d in p.rglob(f"{STORE_NAME}/zarr.json")))
    return runs


__all__ = ["TrajectoryWriter", "TrajectoryReader", "Snapshot", "make_layout", "pack", "unpack", "flatten_batch",
           "numeric_hparams", "find_runs", "is_run", "STORE_NAME", "FORMAT_VERSION"]
