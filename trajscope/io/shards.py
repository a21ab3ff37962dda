"""The chunk files of a store and their checked reads: the row-shard codec (:class:`_RowShards`:
where row r lives, the index and its CRC32C), the damage it reports (:class:`_Damage`), and the
reads of rows (:func:`_read_chunk`, :func:`_shard_rows`), shard checks (:func:`_check_shard`) and the
probe's single-chunk arrays (:func:`_whole_array`). Reads only: the writes are :mod:`trajscope.io.files`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from trajscope.errors import TrajscopeError
from trajscope.io.layout import _CRC_BYTES, _EMPTY, _INNER_CODECS, CHECKSUM_VERSION


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

    rows: int  # S, rows per shard
    inner: tuple[int, ...]  # chunk shape without the row axis
    dtype: np.dtype  # little-endian storage dtype
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
        if self.checksums and _crc32c(data[:n]) != data[n : n + _CRC_BYTES]:
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
            if _crc32c(body) != raw[end : end + _CRC_BYTES]:
                raise _Mismatch("checksum mismatch")
        return np.frombuffer(raw, self.dtype, count=math.prod(self.inner), offset=offset).reshape(self.inner)


def _row_shards(doc: Mapping[str, Any], checksums: bool) -> _RowShards:
    """The row-shard layout of an array from its ``zarr.json`` document (with or without
    ``checksums``, as its store's format version says), or _Damage if it is not laid out so."""
    try:
        (codec,) = doc["codecs"]
        cfg = codec["configuration"]
        inner_codecs, index_codecs = cfg["codecs"], cfg["index_codecs"]
        chunk, shard = list(cfg["chunk_shape"]), list(doc["chunk_grid"]["configuration"]["chunk_shape"])
        want = _INNER_CODECS[checksums]
        ok = (
            codec["name"] == "sharding_indexed"
            and cfg.get("index_location") == "start"
            and [c["name"] for c in inner_codecs] == want
            and [c["name"] for c in index_codecs] == want
            and all(c.get("configuration", {}).get("endian", "little") == "little" for c in inner_codecs + index_codecs)
            and chunk[0] == 1
            and shard[1:] == chunk[1:]
            and not np.any(doc["fill_value"])
        )
        dtype = np.dtype(doc["data_type"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise _Damage(f"its zarr.json does not describe format version {CHECKSUM_VERSION if checksums else 2}")
    return _RowShards(
        rows=int(shard[0]),
        inner=tuple(int(c) for c in chunk[1:]),
        dtype=dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype,
        checksums=checksums,
    )


def _shard_path(base: Path, lay: _RowShards, r: int, g: tuple[int, ...]) -> Path:
    """Shard file of row r, chunk column g (Zarr's default chunk keys with a "." separator)."""
    return base / ".".join(map(str, ("c", r // lay.rows, *g)))


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
        raise TrajscopeError(
            f"{store}: {where} is damaged ({d}): the list of {_OPEN_ROWS.get(name, name)} "
            f"cannot be read, so the store cannot be opened"
        ) from None


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
    shape, chunk, dtype, crc = _plain_layout(_array_meta(store, name), checksums)
    if not math.prod(shape):
        return np.zeros(shape, dtype.newbyteorder("="))
    if checksums and crc is None:
        raise _Damage("its zarr.json has no crc32c attribute")
    path = store / name / ".".join(["c"] + ["0"] * len(shape))
    raw = _plain_chunk(path, math.prod(chunk) * dtype.itemsize, read)
    if raw is None:
        return None
    if checksums and google_crc32c.value(raw) != crc:
        raise _Mismatch("checksum mismatch")
    a = np.frombuffer(raw, dtype, count=math.prod(chunk)).reshape(chunk)
    if chunk != shape:
        a = a[tuple(slice(0, n) for n in shape)]
    return a.astype(dtype.newbyteorder("="))


def _plain_layout(doc: Mapping[str, Any], checksums: bool) -> tuple[tuple[int, ...], tuple[int, ...], np.dtype, Any]:
    """(shape, chunk shape, dtype in its stored byte order, CRC32C attribute or None) of a
    single-chunk array document; _Damage unless it describes one."""
    try:
        shape = tuple(int(n) for n in doc["shape"])
        chunk = tuple(int(c) for c in doc["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = doc["codecs"]
        dtype = np.dtype(doc["data_type"])
        big = codecs[0].get("configuration", {}).get("endian", "little") == "big"
        (codec,) = codecs
        crc = doc.get("attributes", {}).get("crc32c") if checksums else None
        ok = (
            codec["name"] == "bytes"
            and chunk in (shape, tuple(max(1, n) for n in shape))
            and (crc is None or isinstance(crc, int))
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        ok = False
    if not ok:
        raise _Damage(f"its zarr.json does not describe format version {CHECKSUM_VERSION if checksums else 2}")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if big else "<")
    return shape, chunk, dtype, crc


def _plain_chunk(path: Path, want: int, read: bool) -> bytes | None:
    """The bytes of a single-chunk array's chunk file (None with ``read=False``: only its size is
    checked); _Damage unless the file is there and ``want`` bytes long."""
    try:
        raw = path.read_bytes() if read else None
        size = len(raw) if raw is not None else path.stat().st_size
    except FileNotFoundError:
        raise _Damage(f"its chunk file {path.name} is missing") from None
    except OSError as e:
        raise _Damage(f"its chunk file {path.name} cannot be read ({type(e).__name__})") from None
    if size != want:
        raise _Damage(f"its chunk file {path.name} has {size} bytes, not {want}")
    return raw
