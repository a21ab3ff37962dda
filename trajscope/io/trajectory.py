"""The ``trajectory.zarr`` run format: the one module that writes and reads it.

Layout (Zarr v3, root group attributes hold the static description)::

    trajectory.zarr/
      zarr.json                 attrs: format, format_version, cadence, parameter/buffer layouts,
                                optimizer class and groups, hparam names, batch structure,
                                model and loss capture, optimizer-state layouts
      commit/zarr.json          attrs: records (valid rows), last_step, skipped, restarts  <- commit marker
      records       (R, 4)  float64   step, loss, batch size (-1: no batch), optimizer-state layout id (-1: none)
      hparams       (R, G, H) float64 per-group numeric hyperparameters in force for the update
      grad_norms    (R, 2)  float64   the step's global gradient norms: as the optimizer stepped it, and
                                      as backward produced it (before unscaling / clipping); NaN: unknown.
                                      Stores made before it (no root attribute ``grad_norms``) read NaN
      params/<pack> (R, n)            every parameter, flattened and packed per storage dtype
      buffers/<pack>(R, n)            every buffer, likewise
      state/<id>/<pack> (R, n)        optimizer state (momentum, exp_avg, exp_avg_sq, step, ...)
      batch/<leaf>  (R, Bmax, ...)    the mini-batch leaves, padded to the largest shape seen
      batch_shape/<leaf> (R, ndim) int64  each record's own shape of the leaf
      skipped       (S,)    int64     steps the recorder had to skip (writer behind, policy "skip")
      forward/count (R,)    int64     micro-batches with a recorded forward state (0: none)  [rows >= forward_from]
      forward/micro (R, M, 3) int64   per micro-batch: samples, mode id (attribute forward_modes), CUDA device (-1)
      forward/rng_cpu  (R, M, n) uint8  torch.get_rng_state() at the start of each micro-batch's forward pass
      forward/rng_cuda (R, M, n) uint8  torch.cuda.get_rng_state(device) likewise (only when trained on CUDA)
      probe/<leaf>                    optional fixed probe batch (stored once)
      extra/model.pt2                 optional ``torch.export`` program (loading it needs trust)

    trajectory.rank<k>.zarr/    distributed runs only (attribute ``distributed``): rank k's batch shard
                                and loss per step, in this same layout without params, buffers, state
                                or hparams (attribute ``shard``); :class:`TrajectoryReader` joins them

Every per-record array is sharded along its rows (Zarr v3 ``sharding_indexed``): a shard file
``c.<s>.<j>`` holds rows ``64 s .. 64 s + 63`` (uncompressed, row i of the shard at a fixed offset
after a 16-byte-per-row index at the start of the file), so a record writes into files that are
already open instead of creating one file per array and row. Row r is valid iff
``r < commit.records``: the commit marker is replaced atomically only after every chunk of the
row and its index entry are written. Capacity grows in blocks so metadata is rarely rewritten.

Integrity (format version 3): every chunk ends with its CRC32C and so does every shard index
(Zarr's ``crc32c`` codec in ``codecs`` and ``index_codecs``), so plain zarr verifies what it reads
too. The reader checks the CRC of every chunk and index it reads; damage to one record (checksum
mismatch, missing or cut-short shard, missing or unreadable array document) is a
:class:`~trajscope.errors.DamagedRecordError` naming the array and the step, damage to what every
record needs (root or commit document, ``records``, ``skipped``) a TrajscopeError at open.
:meth:`TrajectoryReader.check_structure` checks the files without reading the data,
:meth:`TrajectoryReader.verify_records` reads and checks everything. Version 2 stores (no checksums)
are still read and resumed as they are.
Small tensors are packed into one flat array per storage dtype so a small model costs a handful
of chunk writes per step. bfloat16 has no Zarr dtype: it is stored as
its uint16 bit pattern (pack name ``bfloat16``) and viewed back, so it round-trips bit-exactly.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import google_crc32c
import numpy as np
import torch
import zarr

from trajscope.errors import DamagedRecordError, TrajscopeError

FORMAT = "trajscope-trajectory"
FORMAT_VERSION = 3         # 3: CRC32C per chunk and shard index; 2: row shards, no checksums; 1: a file per row
READ_VERSIONS = (2, 3)     # versions this module reads (and resumes, keeping their layout)
CHECKSUM_VERSION = 3       # the first version with checksums
_CRC_BYTES = 4             # a little-endian CRC32C after each chunk and each shard index
STORE_NAME = "trajectory.zarr"


def shard_store_name(rank: int) -> str:
    """The store of rank ``rank``'s batch shards in the folder of a distributed run (rank 0's batch is
    in ``trajectory.zarr`` itself). Beside it, not inside: rank k may create its store before rank 0
    has renamed the main one into place."""
    return f"trajectory.rank{int(rank)}.zarr"

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
#: columns of ``grad_norms``: ‖g‖ the optimizer stepped with (at its step pre-hook: after unscaling and
#: clipping), ‖g‖ as backward accumulated it (scaled by a GradScaler, before clipping)
GRAD_NORM_COLUMNS = ("stepped", "backward")


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
    hparams: np.ndarray | None               # (G, H); None: a rank's batch shard (rank 0 writes them)
    state_layout: list[Slot] | None
    state: dict[str, torch.Tensor]           # pack -> flat
    batch_spec: Any
    batch: list[tuple[str, torch.Tensor]]    # leaves
    forward: list["ForwardState"] = dataclasses.field(default_factory=list)   # per micro-batch
    # GRAD_NORM_COLUMNS: floats, or 0-d tensors the writer converts (no device sync on the training thread)
    grad_norms: tuple[Any, Any] = (math.nan, math.nan)

    @property
    def nbytes(self) -> int:
        tensors = [*self.params.values(), *self.buffers.values(), *self.state.values(), *(t for _, t in self.batch)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclasses.dataclass
class ForwardState:
    """What the forward pass of one micro-batch used, taken as it started (a forward pre-hook on the
    module given to the Recorder): which modules were in train mode and the RNG state its dropout
    masks were drawn from. Replay restores it (``trajscope analyze --train-mode replay``)."""

    size: int                                  # samples of the micro-batch
    training: bool                             # the root module's flag
    differ: tuple[str, ...]                    # submodules whose flag differs from the root's
    rng_cpu: torch.Tensor                      # torch.get_rng_state() (uint8)
    rng_cuda: torch.Tensor | None = None       # torch.cuda.get_rng_state(cuda_device) (uint8)
    cuda_device: int | None = None             # the model's CUDA device, when it trained on one

    @property
    def mode(self) -> dict[str, Any]:
        return {"training": bool(self.training), "differ": sorted(self.differ)}


def _chunks_for(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape of one row of a per-record array (the shard stacks ``_SHARD_ROWS`` of them)."""
    inner = list(shape[1:])
    if len(inner) == 1:
        inner[0] = max(1, min(inner[0], _MAX_CHUNK_ELEMS))
    return (1, *[max(1, int(x)) for x in inner])


# --------------------------------------------------------------------------- checksums and damage
def _crc32c(data: Any) -> bytes:
    """The CRC32C of a contiguous buffer (bytes or numpy array) as the 4 little-endian bytes Zarr's
    ``crc32c`` codec appends. google-crc32c is what zarr itself uses: hardware CRC32C, ~20 GB/s here
    (0.2 ms for 4 MiB), so checking every read costs little next to the read."""
    return struct.pack("<I", google_crc32c.value(data))


class _Damage(Exception):
    """What is wrong with a chunk or an array document, in a few words (``row``: the first damaged
    row, where known); the caller turns it into the one-line error naming the store, array and step."""

    def __init__(self, problem: str, row: int | None = None, array: str | None = None) -> None:
        super().__init__(problem)
        self.row, self.array = row, array


class _Mismatch(_Damage):
    """A checksum mismatch. Read again once before it counts: a reader racing the writer's rewrite
    of a shard index (one ``pwrite``, but page-cache copies are not atomic against reads) can see a
    half-updated index once; real damage reads the same twice."""


def _twice(read: Any) -> Any:
    """``read()``, repeated once if its checksums did not match (see :class:`_Mismatch`)."""
    try:
        return read()
    except _Mismatch:
        return read()


@dataclasses.dataclass(frozen=True)
class _RowShards:
    """Where the rows of a per-record array live: row r, chunk column g is at byte
    ``I + (r mod S) * chunk_bytes`` of shard file ``c.<r // S>.<g>``, whose index (S pairs of
    little-endian uint64 offset, nbytes, all ones for a chunk never written, then its CRC32C:
    I = 16 S + 4 bytes) opens the file. Each chunk is its values then their CRC32C. Without
    ``checksums`` (format version 2) neither CRC is there: I = 16 S, chunk_bytes = the values."""

    rows: int                     # S, rows per shard
    inner: tuple[int, ...]        # chunk shape without the row axis
    dtype: np.dtype               # little-endian storage dtype
    checksums: bool = True

    @property
    def crc_bytes(self) -> int:
        return _CRC_BYTES if self.checksums else 0

    @property
    def value_bytes(self) -> int:
        """Bytes of one chunk's values."""
        return math.prod(self.inner) * self.dtype.itemsize

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk on disk (its index entry's nbytes): the values and their CRC."""
        return self.value_bytes + self.crc_bytes

    @property
    def index_bytes(self) -> int:
        return 16 * self.rows + self.crc_bytes

    def offset(self, r: int) -> int:
        return self.index_bytes + (r % self.rows) * self.chunk_bytes

    def columns(self, extents: Sequence[int]) -> list[tuple[int, ...]]:
        """Chunk-grid coordinates (without the row axis) covering ``extents``."""
        grid: list[tuple[int, ...]] = [()]
        for n, c in zip(extents, self.inner):
            grid = [(*g, j) for g in grid for j in range(-(-int(n) // c))]
        return grid

    def empty_index(self) -> np.ndarray:
        return np.full((self.rows, 2), _EMPTY, dtype="<u8")

    def encode_index(self, idx: np.ndarray) -> bytes:
        """The index as it opens a shard file (its CRC after it)."""
        raw = np.ascontiguousarray(idx, dtype="<u8").tobytes()
        return raw + _crc32c(raw) if self.checksums else raw

    def decode_index(self, data: bytes, name: str = "shard file") -> np.ndarray:
        """The (S, 2) index at the start of a shard file's bytes, its CRC checked."""
        n = 16 * self.rows
        if len(data) < self.index_bytes:
            raise _Damage(f"{name} is cut short inside its index, the store was truncated")
        if self.checksums and _crc32c(data[:n]) != data[n:n + _CRC_BYTES]:
            raise _Mismatch(f"{name}: index checksum mismatch")
        return np.frombuffer(data, dtype="<u8", count=2 * self.rows).reshape(self.rows, 2)

    def entry(self, idx: np.ndarray, r: int) -> int:
        """The offset of row r's chunk from the shard's index (an entry this layout cannot have raises)."""
        off, nbytes = (int(v) for v in idx[r % self.rows])
        if off == _EMPTY:
            raise _Damage("its chunk is missing, the store was truncated")
        if nbytes != self.chunk_bytes:
            raise _Damage(f"its index entry says {nbytes} bytes, not {self.chunk_bytes}")
        return off

    def values(self, raw: bytes, offset: int = 0) -> np.ndarray:
        """The values of the chunk at ``raw[offset:]`` (``chunk_bytes`` long), its CRC checked."""
        if len(raw) < offset + self.chunk_bytes:
            raise _Damage("its shard file is cut short, the store was truncated")
        if self.checksums:
            body = np.frombuffer(raw, np.uint8, count=self.value_bytes, offset=offset)
            end = offset + self.value_bytes
            if _crc32c(body) != raw[end:end + _CRC_BYTES]:
                raise _Mismatch("checksum mismatch")
        return np.frombuffer(raw, self.dtype, count=math.prod(self.inner), offset=offset).reshape(self.inner)


_INNER_CODECS = {False: ["bytes"], True: ["bytes", "crc32c"]}   # per ``checksums``, inner and index alike


def _row_shards(doc: Mapping[str, Any], checksums: bool) -> _RowShards:
    """The row-shard layout of an array from its ``zarr.json`` document (with or without
    ``checksums``, as its store's format version says), or _Damage if it is not laid out so."""
    try:
        (codec,) = doc["codecs"]
        cfg = codec["configuration"]
        inner_codecs, index_codecs = cfg["codecs"], cfg["index_codecs"]
        chunk, shard = list(cfg["chunk_shape"]), list(doc["chunk_grid"]["configuration"]["chunk_shape"])
        want = _INNER_CODECS[checksums]
        ok = (codec["name"] == "sharding_indexed" and cfg.get("index_location") == "start"
              and [c["name"] for c in inner_codecs] == want and [c["name"] for c in index_codecs] == want
              and all(c.get("configuration", {}).get("endian", "little") == "little" for c in inner_codecs + index_codecs)
              and chunk[0] == 1 and shard[1:] == chunk[1:] and not np.any(doc["fill_value"]))
        dtype = np.dtype(doc["data_type"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise _Damage(f"its zarr.json does not describe format version {CHECKSUM_VERSION if checksums else 2}")
    return _RowShards(rows=int(shard[0]), inner=tuple(int(c) for c in chunk[1:]),
                      dtype=dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype, checksums=checksums)


def _codecs(dtype: np.dtype, checksums: bool) -> list[dict[str, Any]]:
    return [_bytes_codec(dtype), *([{"name": "crc32c"}] if checksums else [])]


def _row_array_doc(shape: tuple[int, ...], dtype: np.dtype, checksums: bool = True) -> dict[str, Any]:
    """The ``zarr.json`` of a new per-record array: rows sharded by ``_SHARD_ROWS``, index at the
    start, uncompressed, a CRC32C after each chunk and after the index (``checksums``)."""
    chunk = _chunks_for(shape)
    return _array_doc(shape, dtype, [_SHARD_ROWS, *chunk[1:]], [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": list(chunk), "codecs": _codecs(dtype, checksums),
        "index_codecs": _codecs(np.dtype(np.uint64), checksums), "index_location": "start"}}])


def _plain_array_doc(shape: tuple[int, ...], dtype: np.dtype, crc: int | None = None) -> dict[str, Any]:
    """The ``zarr.json`` of a small array stored as one uncompressed chunk (the probe batch), with the
    CRC32C of that chunk's bytes as the attribute ``crc32c``. In the attributes, not as a codec: the
    chunk file stays the plain values it has been since version 1 (zarr does not check it; trajscope
    does)."""
    doc = _array_doc(shape, dtype, [max(1, n) for n in shape], [_bytes_codec(dtype)])
    if crc is not None:
        doc["attributes"] = {"crc32c": crc}
    return doc


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
                 restart_step: int | None = None, name: str = STORE_NAME) -> None:
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
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Build the empty store (root attributes + commit marker) under a temporary name and rename
            # it into place, so a process killed during creation never leaves a half-made store that
            # looks like a run but cannot be opened.
            for stray in self.run_dir.glob(f".{name}.*.partial"):
                shutil.rmtree(stray, ignore_errors=True)
            tmp = self.run_dir / f".{name}.{uuid.uuid4().hex}.partial"
            (tmp / "commit").mkdir(parents=True)
            _write_group(tmp, {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.time(), **meta,
                               "state_layouts": [], "grad_norms": list(GRAD_NORM_COLUMNS)})
            _write_group(tmp / "commit", {"records": 0, "last_step": None, "skipped": 0, "restarts": []})
            if self.path.exists():  # overwrite=True
                shutil.rmtree(self.path)
            os.rename(tmp, self.path)
            self._commit = _commit_attrs(self.path)
            self.checksums = True
        self.attrs = _read_group_attrs(self.path)
        self.records = int(self._commit["records"])
        self.n_skipped = int(self._commit["skipped"])
        self._written_last_step = self._commit.get("last_step")
        self._arrays: dict[str, dict[str, Any]] = {}       # name -> its zarr.json document
        self._layouts: dict[str, _RowShards] = {}
        # per (array, chunk column): (shard number, open file, its index as written)
        self._files: dict[tuple[str, tuple[int, ...]], tuple[int, Any, np.ndarray]] = {}
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
            self._files[(name, g)] = held            # most recently used last
            return held[1].fileno(), held[2]
        if held is not None:
            held[1].close()
        while len(self._files) >= _MAX_OPEN:         # e.g. a batch array grown to many chunk columns
            self._files.pop(next(iter(self._files)))[1].close()
        path = _shard_path(self.path / name, lay, r, g)
        if not path.exists():
            idx = lay.empty_index()
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
            f = open(tmp, "w+b", buffering=0)
            try:
                f.write(lay.encode_index(idx))
                os.rename(tmp, path)                  # the open file keeps its descriptor
            except BaseException:
                f.close()
                raise
        else:
            f = open(path, "r+b", buffering=0)
            try:
                idx = self._check_index(path, lay, os.pread(f.fileno(), lay.index_bytes, 0))
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
            raise TrajscopeError(f"{path}: shard index does not match format version "
                                 f"{CHECKSUM_VERSION if lay.checksums else 2}; the store is damaged")
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
        data = np.asarray(data, dtype=lay.dtype, order="C")     # (ascontiguousarray would make 0-d rows 1-d)
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
            raw = memoryview(block).cast("B")
            # In pieces: one multi-MiB write() took 3-6x the kernel time of 1 MiB pieces here
            # (2.7 MiB: 2.7-5.7 ms against 0.9 ms on this VM's ext4). The CRC goes with the last one.
            for start in range(0, len(raw), _WRITE_PIECE):
                piece = raw[start:start + _WRITE_PIECE]
                last = start + _WRITE_PIECE >= len(raw)
                tail = crc if last else b""
                wrote = os.pwritev(fd, [piece, tail], off + start) if tail else os.pwrite(fd, piece, off + start)
                if wrote != len(piece) + len(tail):
                    _write_rest(fd, bytes(piece) + tail, wrote, off + start)
            self._write_entry(fd, lay, idx, r, off)

    @staticmethod
    def _write_entry(fd: int, lay: _RowShards, idx: np.ndarray, r: int, off: int) -> None:
        """Point the index entry of row r at its chunk. With checksums the whole index and its CRC
        are rewritten in one write (1028 bytes, inside the file's first page, which a killed process
        completes or leaves untouched); without, the one 16-byte entry."""
        idx[r % lay.rows] = (off, lay.chunk_bytes)
        if lay.checksums:
            os.pwrite(fd, lay.encode_index(idx), 0)
        else:
            os.pwrite(fd, struct.pack("<QQ", off, lay.chunk_bytes), 16 * (r % lay.rows))

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
                raise TrajscopeError("the batch structure changed during the run (leaves or dtypes); "
                                     "record it to a new folder")
        for key, t in snap.batch:
            leaf = _to_numpy(t.contiguous())
            self._write_row(f"batch/{key}", r, leaf)
            if leaf.ndim:   # leaves are stored padded to the largest shape seen: keep each one's own
                self._write_row(f"batch_shape/{key}", r, np.array(leaf.shape, dtype=np.int64))
        self._write_forward(r, snap.forward)
        if snap.hparams is not None:
            self._write_row("hparams", r, np.asarray(snap.hparams, dtype=np.float64))
        if "grad_norms" in self.attrs:   # a store resumed from before the column goes on without it
            self._write_row("grad_norms", r, np.array([_float(v) for v in snap.grad_norms], dtype=np.float64))
        self._write_row("records", r, np.array([snap.step, snap.loss, batch_size, layout_id], dtype=np.float64))
        if snap.batch_spec is not None and "batch" not in self.attrs:
            self.set_attrs(batch={"spec": snap.batch_spec,
                                  "dtypes": {k: storage_dtype(t.dtype)[0] for k, t in snap.batch}})
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
            self.set_attrs(forward_from=r)      # described before any row that uses it is committed
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
        self._write_row("forward/micro", r, np.array(
            [[fs.size, i, -1 if fs.cuda_device is None else fs.cuda_device] for fs, i in zip(forward, ids)], np.int64))
        self._write_row("forward/rng_cpu", r, np.stack([fs.rng_cpu.numpy() for fs in forward]))
        cuda = [fs.rng_cuda for fs in forward]
        if any(t is not None for t in cuda):
            n = max(t.numel() for t in cuda if t is not None)
            rows = np.zeros((len(cuda), n), np.uint8)
            for i, t in enumerate(cuda):
                if t is not None:
                    rows[i, :t.numel()] = t.numpy()
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
        steps = _leading_rows(self.path, "records", n, self.checksums)[:, 0].astype(np.int64) if n else np.zeros(0, np.int64)
        keep = int(np.searchsorted(steps, step, side="left"))
        sk_n = int(self._commit["skipped"])
        sk = _leading_rows(self.path, "skipped", sk_n, self.checksums).astype(np.int64) if sk_n else np.zeros(0, np.int64)
        keep_sk = int(np.sum(sk < step))
        if keep == n and keep_sk == sk_n:
            return
        restarts = list(self._commit.get("restarts", []))
        restarts.append({"at_step": int(step), "dropped_records": n - keep, "time": time.time()})
        last = int(steps[keep - 1]) if keep else None
        self.attrs = getattr(self, "attrs", None) or _read_group_attrs(self.path)   # (called from __init__ too)
        if int(self.attrs.get("forward_from", -1)) > keep:   # the rows rewritten from keep on write forward/count
            self.set_attrs(forward_from=keep)
        self._write_commit(records=keep, last_step=last, skipped=keep_sk, restarts=restarts)
        self.records, self.n_skipped, self._written_last_step = keep, keep_sk, last


# --------------------------------------------------------------------------- reader
class TrajectoryReader:
    """Read side of the format: committed rows only, every chunk and shard index read checked
    against its CRC32C (format version 3; version 2 stores have none)."""

    def __init__(self, run_dir: str | Path, name: str = STORE_NAME) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        if not self.run_dir.exists():
            raise TrajscopeError(f"{self.run_dir} does not exist: give the folder a Recorder wrote (it holds {STORE_NAME})")
        if not (self.path / "zarr.json").exists():
            raise TrajscopeError(f"{self.run_dir} is not a trajscope run: no {STORE_NAME} inside; record one with trajscope.Recorder")
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
        self._records = (_leading_rows(self.path, "records", self.n_records, self.checksums) if self.n_records
                         else np.zeros((0, len(RECORD_COLUMNS))))
        n_sk = int(c.get("skipped", 0))
        self.skipped = (_leading_rows(self.path, "skipped", n_sk, self.checksums).astype(np.int64) if n_sk
                        else np.zeros(0, np.int64))
        dist = self.attrs.get("distributed")
        self.shards = _RankShards(self.run_dir, int(dist["world_size"])) if isinstance(dist, Mapping) else None

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
        return unpack(self.buffer_layout, {p: self._read_row(f"buffers/{p}", r) for p in pack_sizes(self.buffer_layout)})

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
            return None      # Recorder.batch() was not called for this step
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
        return {key: _from_numpy(self._read_row(f"batch/{key}", r, self._batch_shape(key, r)), dt)
                for key, dt in self.attrs["batch"]["dtypes"].items()}

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
            out.append(ForwardState(size=int(size), training=bool(modes[mode]["training"]),
                                    differ=tuple(modes[mode]["differ"]), rng_cpu=torch.from_numpy(cpu[i].copy()),
                                    rng_cuda=None if dev < 0 else torch.from_numpy(cuda[i].copy()),
                                    cuda_device=None if dev < 0 else int(dev)))
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
        if "shard" not in self.attrs:      # a rank's batch shards: rank 0 records the hyperparameters
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
                if d.row is None:          # an array document: every record of the array is affected
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
        shape_name = f"batch_shape/{name[len('batch/'):]}"
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
        nbytes = sum(self._whole_bytes(name, n) for name, n in (("records", self.n_records),
                                                                ("skipped", len(self.skipped))) if n)
        for r in range(self.n_records):
            for name, mask in arrays:
                if not mask[r]:
                    continue
                shape = None
                if name.startswith("batch/"):
                    key = name[len("batch/"):]
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


class _RankShards:
    """The batch shards of ranks 1 .. W-1 of a distributed run (rank 0's is the main store's batch),
    each in its own store :func:`shard_store_name` (no rank waits for another while recording).

    The batch of step t is the union of the ranks' shards of t in rank order, as DDP's averaged
    gradient used it. A rank's store is read again when it lacks t (its writer may be a commit
    behind); a shard still missing, or not matching rank 0's structure, is a DamagedRecordError for
    step t alone (a rank whose recorder stopped damages only the steps after it stopped)."""

    def __init__(self, run_dir: Path, world_size: int) -> None:
        self.run_dir, self.world_size = run_dir, world_size
        self._readers: dict[int, TrajectoryReader | str] = {}
        self._rows: dict[int, dict[int, int]] = {}       # rank -> {step: its row there}
        self._mean: np.ndarray | None = None             # mean_loss, until a store is read again

    def reader(self, k: int, refresh: bool = False) -> TrajectoryReader | str:
        """Rank k's shard store, or why it cannot be read."""
        if refresh or k not in self._readers:
            name = shard_store_name(k)
            try:
                rd: TrajectoryReader | str = TrajectoryReader(self.run_dir, name)
            except TrajscopeError as e:
                rd = (str(e) if (self.run_dir / name).exists() else
                      f"rank {k} recorded nothing, there is no {name}: create the Recorder on every rank, with the "
                      f"same path (or pass distributed=False to record rank 0's shard alone)")
            self._readers[k], self._mean = rd, None
            # the last row of a step: a restart re-records it after the rows it invalidated
            self._rows[k] = {int(st): r for r, st in enumerate(rd.steps)} if isinstance(rd, TrajectoryReader) else {}
        return self._readers[k]

    def stores(self, store: Path) -> list[TrajectoryReader]:
        """Every rank's shard store (for the integrity checks); one that cannot be opened is damage."""
        out = []
        for k in range(1, self.world_size):
            rd = self.reader(k, refresh=True)
            if isinstance(rd, str):
                raise DamagedRecordError(store, shard_store_name(k), None, f"rank {k}'s batch shards cannot be read: {rd}")
            out.append(rd)
        return out

    def _row(self, k: int, step: int) -> tuple[TrajectoryReader | str, int | None]:
        """Rank k's store and its row of ``step`` (None: not there), read again once if absent."""
        rd = self.reader(k)
        if step not in self._rows[k]:
            rd = self.reader(k, refresh=True)
        return rd, self._rows[k].get(step)

    def missing(self, steps: np.ndarray) -> dict[int, np.ndarray]:
        """Per rank k > 0, the ``steps`` its store has no record of (its recorder stopped or lags)."""
        for k in range(1, self.world_size):
            self.reader(k, refresh=True)
        return {k: steps[~np.isin(steps, list(self._rows[k]))] for k in range(1, self.world_size)}

    def mean_loss(self, steps: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Per step, the mean of rank 0's loss ``own`` and the other ranks' (NaN where one is missing)."""
        if self._mean is None or len(self._mean) != len(steps):
            losses = [own]
            for k in range(1, self.world_size):
                rd, rows = self.reader(k), self._rows[k]
                theirs = rd.losses if isinstance(rd, TrajectoryReader) else np.zeros(0)
                losses.append(np.array([theirs[rows[s]] if s in rows else np.nan for s in steps.tolist()]))
            self._mean = np.mean(losses, axis=0)
        return self._mean

    def forward(self, step: int, own: list[ForwardState]) -> list[ForwardState]:
        """Rank 0's forward states ``own`` of ``step`` followed by those of ranks 1 .. W-1 (``[]`` where a
        rank has none: the step then replays in eval mode, said at analysis)."""
        out = list(own)
        for k in range(1, self.world_size):
            rd, r = self._row(k, step)
            theirs = rd._own_forward(r) if isinstance(rd, TrajectoryReader) and r is not None else None
            if not theirs:
                return []
            out += theirs
        return out

    def join(self, store: Path, step: int, meta: Mapping[str, Any], leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rank 0's ``leaves`` of ``step`` followed, along the batch axis, by those of ranks 1 .. W-1."""
        parts = [leaves]
        for k in range(1, self.world_size):
            name = shard_store_name(k)
            rd, r = self._row(k, step)

            def damaged(problem: str) -> DamagedRecordError:
                return DamagedRecordError(store, name, step, f"rank {k}'s batch shard {problem}")

            if r is None:
                why = rd if isinstance(rd, str) else "its recorder stopped before this step or has not written it yet"
                raise damaged(f"is missing ({why})")
            if rd._records[r, 2] < 0:
                raise damaged(f"is missing (rank 0 gave a batch for this step, rank {k} did not)")
            if rd.attrs.get("batch") != meta:
                raise damaged("has another structure or dtype than rank 0's")
            parts.append(rd._batch_leaves(r))
        out = {}
        for key, first in leaves.items():
            if first.dim() == 0:
                out[key] = first
                continue
            shards = [p[key] for p in parts]
            if any(t.shape[1:] != first.shape[1:] for t in shards):
                raise DamagedRecordError(store, f"batch/{key}", step, "the ranks' shards differ in trailing shape "
                                         f"({[list(t.shape) for t in shards]})")
            out[key] = torch.cat(shards)
        return out


def _read_chunk(base: Path, lay: _RowShards, r: int, g: tuple[int, ...]) -> np.ndarray:
    """The values of row r's chunk in column g: one ``pread`` of its shard's index, one of the
    chunk, both checksums checked (_Damage otherwise)."""
    path = _shard_path(base, lay, r, g)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _Damage(f"shard file {path.name} is missing, the store was truncated") from None
    except OSError as e:
        raise _Damage(f"shard file {path.name} cannot be read ({type(e).__name__})") from None
    try:
        idx = lay.decode_index(os.pread(fd, lay.index_bytes, 0), f"shard file {path.name}")
        raw = os.pread(fd, lay.chunk_bytes, lay.entry(idx, r))
    except OverflowError:  # an offset past any file: a garbage index entry
        raise _Damage("its index entry points past the end of the file") from None
    except OSError as e:
        raise _Damage(f"shard file {path.name} cannot be read ({type(e).__name__})") from None
    finally:
        os.close(fd)
    return lay.values(raw)


def _check_shard(base: Path, lay: _RowShards, rows: np.ndarray, g: tuple[int, ...]) -> None:
    """_Damage (``row``: the earliest of ``rows``, all in one shard, that it reaches) unless the
    shard file of ``rows`` in column g is present, its index checksum matches, and every entry of
    ``rows`` lies inside the file (one ``open``, ``fstat`` and ``pread`` of the index)."""
    first = int(rows[0])
    path = _shard_path(base, lay, first, g)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _Damage(f"shard file {path.name} is missing, the store was truncated", first) from None
    except OSError as e:
        raise _Damage(f"shard file {path.name} cannot be read ({type(e).__name__})", first) from None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, lay.index_bytes, 0)
    except OSError as e:
        raise _Damage(f"shard file {path.name} cannot be read ({type(e).__name__})", first) from None
    finally:
        os.close(fd)
    try:
        idx = lay.decode_index(head, f"shard file {path.name}")
    except _Damage as d:
        d.row = first
        raise
    entries = idx[rows % lay.rows]
    room = size - lay.chunk_bytes
    bad = (entries[:, 0] == _EMPTY) | (entries[:, 1] != lay.chunk_bytes)
    bad |= (entries[:, 0] > room) if room >= 0 else True
    if bool(np.any(bad)):
        r = int(rows[int(np.argmax(bad))])
        try:
            lay.entry(idx, r)
        except _Damage as d:
            d.row = r
            raise
        raise _Damage(f"shard file {path.name} is cut short, the store was truncated", r)


def _float(v: Any) -> float:
    """A float from a number or a 0-d tensor (on any device: the writer thread may wait for it)."""
    return float(v.detach().to("cpu", torch.float64)) if isinstance(v, torch.Tensor) else float(v)


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
    if isinstance(ver, bool) or ver not in READ_VERSIONS:
        raise TrajscopeError(f"{path} has format version {ver}, this trajscope reads versions "
                             f"{', '.join(map(str, READ_VERSIONS))}: use the trajscope release that recorded it")


def _version(attrs: Mapping[str, Any], path: Path) -> int:
    """The store's format version, checked to be one this module reads."""
    _check_version(attrs, path)
    return int(attrs["format_version"])


def _array_meta(store: Path, name: str) -> dict[str, Any]:
    """The ``zarr.json`` document of array ``name`` (_Damage if it is missing or unreadable)."""
    try:
        doc = json.loads((store / name / "zarr.json").read_bytes())
    except FileNotFoundError:
        raise _Damage("its zarr.json is missing") from None
    except (OSError, ValueError) as e:
        raise _Damage(f"its zarr.json is unreadable, {type(e).__name__}") from None
    if not isinstance(doc, dict):
        raise _Damage("its zarr.json is not an array document")
    return doc


_OPEN_ROWS = {"records": "recorded steps", "skipped": "skipped steps"}


def _leading_rows(store: Path, name: str, n: int, checksums: bool) -> np.ndarray:
    """Rows ``0 .. n-1`` of ``records`` or ``skipped``, read at open and restart straight from
    their shard files (zarr's reads would start an event-loop thread and a thread pool, in the
    training process when a run resumes). Every record needs them: damage there is a
    TrajscopeError that says the store cannot be opened."""
    try:
        return _shard_rows(store, name, np.arange(n), checksums)
    except _Damage as d:
        where = name if d.row is None else f"row {d.row} of {name}"
        raise TrajscopeError(f"{store}: {where} is damaged ({d}): the list of {_OPEN_ROWS.get(name, name)} "
                             f"cannot be read, so the store cannot be opened") from None


def _shard_rows(store: Path, name: str, rows: np.ndarray, checksums: bool) -> np.ndarray:
    """Rows ``rows`` (ascending) of a per-record array whose row is one chunk (``records``,
    ``skipped``, ``batch_shape/*``), each shard file read once and every checksum checked; _Damage
    (``row``: the first damaged one) for a chunk never written, cut short or not matching its CRC."""
    lay = _row_shards(_array_meta(store, name), checksums)
    out = np.empty((len(rows), *lay.inner), lay.dtype.newbyteorder("="))
    shards = rows // lay.rows
    g = (0,) * len(lay.inner)

    def read_shard(sel: np.ndarray) -> None:
        first = int(rows[sel[0]])
        path = _shard_path(store / name, lay, first, g)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise _Damage(f"shard file {path.name} is missing, the store was truncated", first) from None
        except OSError as e:
            raise _Damage(f"shard file {path.name} cannot be read ({type(e).__name__})", first) from None
        r = first
        try:
            idx = lay.decode_index(data, f"shard file {path.name}")
            for i in sel:
                r = int(rows[i])
                out[i] = lay.values(data, lay.entry(idx, r))
        except _Damage as d:
            d.row = r
            raise

    for s in np.unique(shards).tolist():
        sel = np.nonzero(shards == s)[0]
        _twice(lambda: read_shard(sel))
    return out


def _whole_array(store: Path, name: str, checksums: bool, read: bool = True) -> np.ndarray | None:
    """An array stored as one uncompressed chunk (the probe: :func:`_plain_array_doc`, the layout
    zarr gave it in earlier versions), checked against the CRC32C in its attributes with
    ``checksums``; _Damage if it is not. With ``read=False`` only the document and the chunk
    file's size are checked."""
    doc = _array_meta(store, name)
    try:
        shape = tuple(int(n) for n in doc["shape"])
        chunk = tuple(int(c) for c in doc["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = doc["codecs"]
        dtype = np.dtype(doc["data_type"])
        big = codecs[0].get("configuration", {}).get("endian", "little") == "big"
        (codec,) = codecs
        crc = doc.get("attributes", {}).get("crc32c") if checksums else None
        ok = (codec["name"] == "bytes" and chunk in (shape, tuple(max(1, n) for n in shape))
              and (crc is None or isinstance(crc, int)))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        ok = False
    if not ok:
        raise _Damage(f"its zarr.json does not describe format version {CHECKSUM_VERSION if checksums else 2}")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if big else "<")
    if not math.prod(shape):
        return np.zeros(shape, dtype.newbyteorder("="))
    path = store / name / ".".join(["c"] + ["0"] * len(shape))
    if checksums and crc is None:
        raise _Damage("its zarr.json has no crc32c attribute")
    want = math.prod(chunk) * dtype.itemsize
    try:
        raw = path.read_bytes() if read else None
        size = len(raw) if read else path.stat().st_size
    except FileNotFoundError:
        raise _Damage(f"its chunk file {path.name} is missing") from None
    except OSError as e:
        raise _Damage(f"its chunk file {path.name} cannot be read ({type(e).__name__})") from None
    if size != want:
        raise _Damage(f"its chunk file {path.name} has {size} bytes, not {want}")
    if not read:
        return None
    if checksums and google_crc32c.value(raw) != crc:
        raise _Mismatch("checksum mismatch")
    a = np.frombuffer(raw, dtype, count=math.prod(chunk)).reshape(chunk)
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


def _write_rest(fd: int, data: Any, wrote: int, at: int) -> None:
    """Finish a write the kernel cut short (a disk filling up): the next write of the rest then
    fails with the real reason (ENOSPC), which the recorder's one warning names."""
    view = memoryview(data).cast("B")
    while wrote < len(view):
        n = os.pwrite(fd, view[wrote:], at + wrote)
        if n == 0:
            raise OSError(errno.EIO, "write made no progress")
        wrote += n


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


def is_run(path: str | Path, name: str = STORE_NAME) -> bool:
    """Whether ``path`` holds a run (or, with ``name``, that store of a run, e.g. a rank's shards)."""
    return (Path(path) / name / "zarr.json").exists()


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among ``paths`` and, like a TensorBoard logdir, among their sub-folders."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if is_run(p):
            runs.append(p)
        elif p.is_dir():
            runs.extend(sorted(d.parent.parent for d in p.rglob(f"{STORE_NAME}/zarr.json")))
    return runs


__all__ = ["TrajectoryWriter", "TrajectoryReader", "Snapshot", "ForwardState", "make_layout", "pack", "unpack",
           "flatten_batch", "numeric_hparams", "find_runs", "is_run", "shard_store_name", "STORE_NAME", "FORMAT_VERSION",
           "READ_VERSIONS"]
