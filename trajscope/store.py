"""The ``trajectory.zarr`` run format: the one module that writes and reads it.

Layout (Zarr v3, root group attributes hold the static description)::

    trajectory.zarr/
      zarr.json                 attrs: format, format_version, cadence, parameter/buffer layouts,
                                optimizer class and groups, hparam names, batch structure,
                                model and loss capture, optimizer-state layouts
      commit/zarr.json          attrs: records (valid rows), last_step, skipped, restarts  <- commit marker
      records       (R, 4)  float64   step, loss, batch size, optimizer-state layout id (-1: none)
      hparams       (R, G, H) float64 per-group numeric hyperparameters in force for the update
      params/<pack> (R, n)            every parameter, flattened and packed per storage dtype
      buffers/<pack>(R, n)            every buffer, likewise
      state/<id>/<pack> (R, n)        optimizer state (momentum, exp_avg, exp_avg_sq, step, ...)
      batch/<leaf>  (R, Bmax, ...)    the mini-batch leaves; the batch size column says how many rows count
      skipped       (S,)    int64     steps the recorder had to skip (writer behind, policy "skip")
      probe/<leaf>                    optional fixed probe batch (stored once)
      extra/model.pt2                 optional ``torch.export`` program (loading it needs trust)

Row r is valid iff ``r < commit.records``: Zarr's append writes metadata before chunks, so the
commit marker is written only after every chunk of the row is on disk. Capacity grows in blocks so
metadata is rarely rewritten. Small tensors are packed into one flat array per storage dtype so a
small model costs a handful of chunk writes per step. bfloat16 has no Zarr dtype: it is stored as
its uint16 bit pattern (pack name ``bfloat16``) and viewed back, so it round-trips bit-exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from trajscope.errors import TrajscopeError

FORMAT = "trajscope-trajectory"
FORMAT_VERSION = 1
STORE_NAME = "trajectory.zarr"
_CAPACITY_BLOCK = 64
_MAX_CHUNK_ELEMS = 1 << 22  # 4 Mi elements per chunk along a packed row
# No compression. Weights barely compress: Blosc lz4 + bitshuffle saved 12% of the bytes of a
# 784-512-512-10 MLP but doubled the writer's CPU per record (3.9 vs 1.9 ms for 2.9 MiB), and on a
# small machine that CPU is taken from the training thread (benchmarks/bench_recorder.py). Arrays of
# stores written with a compressor are still read, and written (see ``_chunk_encoder``).
_CODEC = None
# Every written chunk is stored, even one equal to the fill value, so that a missing chunk file
# always means a truncated store (Zarr would otherwise read it back silently as zeros).
_ARRAY_CONFIG = {"write_empty_chunks": True}
# Chunk files are named ``c.<row>.<j>`` inside the array's folder. The default ``c/<row>/<j>`` costs a
# new directory per row and array (5+ mkdir per record, ~0.2-1 ms each on this VM's ext4).
_CHUNK_KEYS = {"name": "default", "separator": "."}
_WRITE_PIECE = 1 << 20
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


@dataclass(frozen=True)
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
            return {"t": "dict", "items": {str(k): walk(v, f"{key}.{k}") for k, v in o.items()}}
        if isinstance(o, (int, float, bool)):
            return {"t": "const", "value": o}
        raise TypeError(f"cannot record a batch element of type {type(o).__name__}")

    spec = walk(obj, prefix)
    return spec, leaves


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
@dataclass
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
    inner = list(shape[1:])
    if len(inner) == 1:
        inner[0] = max(1, min(inner[0], _MAX_CHUNK_ELEMS))
    return (1, *[max(1, int(x)) for x in inner])


class TrajectoryWriter:
    """Appends records to ``RUN/trajectory.zarr``. Not thread-safe: one writer thread owns it."""

    def __init__(self, run_dir: str | Path, meta: Mapping[str, Any] | None = None, *, resume: bool = False,
                 restart_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STORE_NAME
        exists = (self.path / "zarr.json").exists()
        if exists and resume:
            self.root = _open_root(self.path, mode="r+")
            _check_version(self.root, self.path)
            _remove_partials(self.path)
            self._commit = _commit_attrs(self.root, self.path)
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
            root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.time(), **meta,
                     "state_layouts": []}
            root.update_attributes(_jsonable(attrs))
            root.create_group("commit").update_attributes({"records": 0, "last_step": None, "skipped": 0, "restarts": []})
            if self.path.exists():  # overwrite=True
                shutil.rmtree(self.path)
            os.rename(tmp, self.path)
            self.root = _open_root(self.path, mode="r+")
            self._commit = _commit_attrs(self.root, self.path)
        self.attrs = dict(self.root.attrs)
        self.records = int(self._commit["records"])
        self.n_skipped = int(self._commit["skipped"])
        self._written_last_step = self._commit.get("last_step")
        self._arrays: dict[str, zarr.Array] = {}
        self._encoders: dict[str, Any] = {}
        self._dirs: set[Path] = set()
        self._state_layouts = [[Slot.from_json(s) for s in lay] for lay in self.attrs.get("state_layouts", [])]

    @property
    def last_step(self) -> int | None:
        return self._commit.get("last_step")

    def _write_commit(self, **changes: Any) -> None:
        """Rewrite ``commit/zarr.json`` (a Zarr v3 group document) atomically, in one write.

        Written here rather than with ``Group.update_attributes``: zarr's path (event loop and
        executor hops) cost ~2.5 ms per record while training ran, against ~0.1 ms for this.
        (``attrs.update`` must not be used at all: it writes the file once per key, so a kill between
        two of those writes left ``records`` and ``last_step`` disagreeing.)
        """
        new = {**self._commit, **changes}
        doc = {"attributes": new, "zarr_format": 3, "node_type": "group"}
        path = self.path / "commit" / "zarr.json"
        tmp = path.with_name(f"zarr.json.{uuid.uuid4().hex}.partial")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, path)
        self._commit = new

    # -- arrays --------------------------------------------------------------------------------
    def _array(self, name: str, inner: tuple[int, ...], dtype: np.dtype, rows: int) -> zarr.Array:
        """Open or create the array ``name`` with room for ``rows`` rows (capacity grows in blocks)."""
        arr = self._arrays.get(name)
        if arr is None:
            if name in self.root:
                arr = self.root[name].with_config(_ARRAY_CONFIG)
            else:
                cap = max(_CAPACITY_BLOCK, rows)
                shape = (cap, *inner)
                arr = self.root.create_array(name, shape=shape, dtype=dtype, chunks=_chunks_for(shape),
                                             fill_value=0, compressors=_CODEC, config=_ARRAY_CONFIG,
                                             chunk_key_encoding=_CHUNK_KEYS)
            self._arrays[name] = arr
        if arr.shape[0] < rows or any(a < b for a, b in zip(arr.shape[1:], inner)):
            new0 = max(arr.shape[0], ((rows + _CAPACITY_BLOCK - 1) // _CAPACITY_BLOCK) * _CAPACITY_BLOCK)
            arr.resize((new0, *[max(a, b) for a, b in zip(arr.shape[1:], inner)]))
        return arr

    def _write_row(self, name: str, r: int, data: np.ndarray) -> None:
        """Write ``data`` as row ``r`` of array ``name`` (rows are whole chunks: ``chunks[0] == 1``).

        The chunk files are encoded and written here directly instead of through ``Array.__setitem__``:
        zarr's generic path (indexing, event-loop round trips, an executor hop per chunk) made one
        record of a 2.6 MiB model cost ~6.5 ms instead of ~2 ms for the same bytes. The files are
        what zarr reads for the array's metadata (its key encoding and codec chain; edge chunks padded
        with the fill value). A plain write is enough for crash safety: only rows below the commit
        marker are valid, and the marker is replaced atomically after every chunk of the row is
        written. Arrays whose codecs this does not handle are written by zarr.
        """
        arr = self._array(name, data.shape, data.dtype, r + 1)
        enc = self._encoders.get(name)
        if enc is None:
            enc = self._encoders[name] = _chunk_encoder(arr)
        if enc is False:
            if data.ndim == 0:
                arr[r] = data
            else:
                arr[(r, *[slice(0, n) for n in data.shape])] = data
            return
        dtype, encode = enc
        inner = arr.chunks[1:]
        data = np.asarray(data, dtype=dtype, order="C")     # (ascontiguousarray would make 0-d rows 1-d)
        base = self.path / name
        grid = [()]
        for n, c in zip(data.shape, inner):
            grid = [(*g, j) for g in grid for j in range(-(-n // c))]
        for g in grid:
            block = data[tuple(slice(j * c, (j + 1) * c) for j, c in zip(g, inner))]
            if block.shape != tuple(inner):
                full = np.zeros(inner, dtype=dtype)          # fill_value is 0 for every array
                full[tuple(slice(0, n) for n in block.shape)] = block
                block = full
            path = base / arr.metadata.encode_chunk_key((r, *g))
            if path.parent not in self._dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._dirs.add(path.parent)
            data_bytes = memoryview(encode(np.asarray(block, order="C"))).cast("B")
            with open(path, "wb") as f:
                # In pieces: one multi-MiB write() took 3-6x the kernel time of 1 MiB pieces here
                # (2.7 MiB: 2.7-5.7 ms against 0.9 ms on this VM's ext4).
                for start in range(0, len(data_bytes), _WRITE_PIECE):
                    f.write(data_bytes[start:start + _WRITE_PIECE])

    def _state_layout_id(self, layout: list[Slot] | None) -> int:
        if layout is None:
            return -1
        for i, existing in enumerate(self._state_layouts):
            if existing == layout:
                return i
        self._state_layouts.append(layout)
        # The new layout is described before any row that uses it can be committed.
        self.root.attrs["state_layouts"] = [[s.to_json() for s in lay] for lay in self._state_layouts]
        return len(self._state_layouts) - 1

    def set_attrs(self, **attrs: Any) -> None:
        self.root.update_attributes(_jsonable(attrs))
        self.attrs.update(_jsonable(attrs))

    def write_probe(self, probe: Any) -> None:
        spec, leaves = flatten_batch(probe, "probe")
        for key, t in leaves:
            data = _to_numpy(t.detach().to("cpu").contiguous())
            self.root.create_array(f"probe/{key}", shape=data.shape, dtype=data.dtype,
                                   chunks=data.shape or (1,), fill_value=0, compressors=_CODEC, overwrite=True,
                                   chunk_key_encoding=_CHUNK_KEYS)[...] = data
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
        batch_size = snap.batch[0][1].shape[0] if snap.batch and snap.batch[0][1].dim() > 0 else 0
        for prefix, packs in (("params", snap.params), ("buffers", snap.buffers)):
            for pname, flat in packs.items():
                self._write_row(f"{prefix}/{pname}", r, _to_numpy(flat))
        for pname, flat in snap.state.items():
            self._write_row(f"state/{layout_id}/{pname}", r, _to_numpy(flat))
        for key, t in snap.batch:
            self._write_row(f"batch/{key}", r, _to_numpy(t.contiguous()))
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
        rec = self.root["records"] if "records" in self.root else None
        n = int(self._commit["records"])
        steps = rec[:n, 0].astype(np.int64) if (rec is not None and n) else np.zeros(0, np.int64)
        keep = int(np.searchsorted(steps, step, side="left"))
        sk_n = int(self._commit["skipped"])
        sk = self.root["skipped"][:sk_n] if (sk_n and "skipped" in self.root) else np.zeros(0, np.int64)
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
        self.root = _open_root(self.path, mode="r")
        _check_version(self.root, self.path)
        self.attrs = dict(self.root.attrs)
        try:
            c = dict(self.root["commit"].attrs)
        except KeyError:
            raise TrajscopeError(f"{self.path} has no commit marker: the store is damaged (re-record the run)") from None
        self.n_records = int(c["records"])
        self.restarts = list(c.get("restarts", []))
        self.param_layout = [Slot.from_json(s) for s in self.attrs["params"]]
        self.buffer_layout = [Slot.from_json(s) for s in self.attrs.get("buffers", [])]
        self.state_layouts = [[Slot.from_json(s) for s in lay] for lay in self.attrs.get("state_layouts", [])]
        if self.n_records:
            self._check_chunks("records", range(self.n_records))
            self._records = self._read("records", slice(0, self.n_records))
        else:
            self._records = np.zeros((0, len(RECORD_COLUMNS)))
        n_sk = int(c.get("skipped", 0))
        if n_sk:
            self._check_chunks("skipped", range(n_sk))
        self.skipped = self._read("skipped", slice(0, n_sk)).astype(np.int64) if n_sk else np.zeros(0, np.int64)

    def _read(self, name: str, index: Any) -> np.ndarray:
        try:
            arr = self.root[name]
        except KeyError:
            raise TrajscopeError(f"{self.path} is missing array {name!r}: the store is truncated or damaged") from None
        try:
            return arr[index]
        except Exception as e:  # a chunk file that cannot be decoded
            raise TrajscopeError(f"{self.path}/{name}: cannot read ({type(e).__name__}: {e}); the store is damaged") from None

    def _check_chunks(self, name: str, rows: range, extent1: int | None = None) -> None:
        """Raise if a chunk file covering ``rows`` (and, along axis 1, ``[0, extent1)``) is missing.

        A missing chunk file would silently read back as the fill value. Every chunk of a committed
        row is written (``write_empty_chunks``), so a missing one means a truncated store. Checking
        the row's directory is not enough: deleting one chunk file leaves the directory behind.
        """
        try:
            arr = self.root[name]
        except KeyError:
            raise TrajscopeError(f"{self.path} is missing array {name!r}: the store is truncated or damaged") from None
        shape, chunks = arr.shape, arr.chunks
        inner = [range(-(-n // c)) for n, c in zip(shape[1:], chunks[1:])]
        if inner and extent1 is not None:
            inner[0] = range(-(-min(extent1, shape[1]) // chunks[1]))
        grid = [()]
        for axis in inner:
            grid = [(*g, i) for g in grid for i in axis]
        base = self.path / name
        for r in rows:
            for g in grid:
                if not (base / arr.metadata.encode_chunk_key((r // chunks[0], *g))).is_file():
                    raise TrajscopeError(f"{self.path}/{name}: a chunk of record {r} is missing; the store is truncated "
                                         f"(re-record, or analyse fewer steps)")

    def _has_chunk(self, name: str, r: int) -> bool:
        try:
            arr = self.root[name]
        except KeyError:
            return False
        if arr.shape[0] <= r:
            return False
        return (self.path / name / arr.metadata.encode_chunk_key((r, *[0] * (arr.ndim - 1)))).is_file()

    def _read_row(self, name: str, r: int, extent1: int | None = None) -> np.ndarray:
        """One committed row, after checking that every chunk file it needs is on disk."""
        self._check_chunks(name, range(r, r + 1), extent1)
        return self._read(name, r)

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
        b = int(self._records[r, 2])
        if b == 0 and not self._has_chunk(f"batch/{next(iter(meta['dtypes']))}", r):
            return None      # Recorder.batch() was not called for this step: the record has no batch
        leaves = {}
        for key, dt in meta["dtypes"].items():
            row = self._read_row(f"batch/{key}", r, extent1=b)
            row = row[:b] if row.ndim else row
            leaves[key] = _from_numpy(row, dt)
        return unflatten_batch(meta["spec"], leaves)

    def probe(self) -> Any | None:
        meta = self.attrs.get("probe")
        if meta is None:
            return None
        leaves = {k: _from_numpy(self._read(f"probe/{k}", ...), dt) for k, dt in meta["dtypes"].items()}
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


def _check_version(root: zarr.Group, path: Path) -> None:
    fmt = root.attrs.get("format")
    ver = root.attrs.get("format_version")
    if fmt != FORMAT:
        raise TrajscopeError(f"{path} is not a trajscope trajectory store (format={fmt!r})")
    if ver != FORMAT_VERSION:
        raise TrajscopeError(f"{path} has format version {ver}, this trajscope reads version {FORMAT_VERSION}: "
                             f"use the trajscope release that recorded it")


def _commit_attrs(root: zarr.Group, path: Path) -> dict[str, Any]:
    try:
        return dict(root["commit"].attrs)
    except KeyError:
        raise TrajscopeError(f"{path} has no commit marker: the store is damaged (re-record the run)") from None


def _chunk_encoder(arr: zarr.Array) -> tuple[np.dtype, Any] | bool:
    """(storage dtype, bytes encoder) reproducing ``arr``'s codec chain, or False to let zarr write."""
    from zarr.codecs import BytesCodec

    ser = arr.serializer
    if arr.filters or not isinstance(ser, BytesCodec) or arr.metadata.fill_value != 0 or arr.chunks[0] != 1:
        return False
    dtype = arr.dtype if isinstance(arr.dtype, np.dtype) else np.dtype(str(arr.dtype))
    if dtype.itemsize > 1:
        endian = getattr(ser.endian, "value", ser.endian)
        dtype = dtype.newbyteorder("<" if endian in (None, "little") else ">")
    if not arr.compressors:
        return dtype, lambda a: memoryview(a).cast("B")
    if len(arr.compressors) == 1 and isinstance(arr.compressors[0], BloscCodec):
        from numcodecs import blosc

        c = arr.compressors[0]
        cname = getattr(c.cname, "value", c.cname).encode()
        shuffle = {"noshuffle": blosc.NOSHUFFLE, "shuffle": blosc.SHUFFLE,
                   "bitshuffle": blosc.BITSHUFFLE}[getattr(c.shuffle, "value", c.shuffle)]
        return dtype, lambda a: blosc.compress(a, cname, c.clevel, shuffle, c.blocksize)
    return False


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
