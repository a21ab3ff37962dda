"""The ``trajectory.zarr`` run format, defined once: store and array names, versions, array
documents (dtype, chunking, sharding, codecs) and the version check. The writer
(:mod:`trajscope.io.writer`) and the reader (:mod:`trajscope.io.reader`) take the format from here.

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
                                or hparams (attribute ``shard``); the reader joins them

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
:meth:`~trajscope.io.reader.TrajectoryReader.check_structure` checks the files without reading the
data, :meth:`~trajscope.io.reader.TrajectoryReader.verify_records` reads and checks everything.
Version 2 stores (no checksums) are still read and resumed as they are.
Small tensors are packed into one flat array per storage dtype so a small model costs a handful
of chunk writes per step. bfloat16 has no Zarr dtype: it is stored as
its uint16 bit pattern (pack name ``bfloat16``) and viewed back, so it round-trips bit-exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trajscope.errors import TrajscopeError

FORMAT = "trajscope-trajectory"
FORMAT_VERSION = 3  # 3: CRC32C per chunk and shard index; 2: row shards, no checksums; 1: a file per row
READ_VERSIONS = (2, 3)  # versions trajscope reads (and resumes, keeping their layout)
CHECKSUM_VERSION = 3  # the first version with checksums
_CRC_BYTES = 4  # a little-endian CRC32C after each chunk and each shard index
STORE_NAME = "trajectory.zarr"


def shard_store_name(rank: int) -> str:
    """The store of rank ``rank``'s batch shards in the folder of a distributed run (rank 0's batch is
    in ``trajectory.zarr`` itself). Beside it, not inside: rank k may create its store before rank 0
    has renamed the main one into place."""
    return f"trajectory.rank{int(rank)}.zarr"


_CAPACITY_BLOCK = 64
_SHARD_ROWS = _CAPACITY_BLOCK  # rows per shard file
_MAX_CHUNK_ELEMS = 1 << 22  # 4 Mi elements per chunk along a packed row
_EMPTY = 2**64 - 1  # shard index entry of a chunk that was never written
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
RECORD_COLUMNS = ("step", "loss", "batch_size", "state_layout")
#: columns of ``grad_norms``: ‖g‖ the optimizer stepped with (at its step pre-hook: after unscaling and
#: clipping), ‖g‖ as backward accumulated it (scaled by a GradScaler, before clipping)
GRAD_NORM_COLUMNS = ("stepped", "backward")


def _chunks_for(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape of one row of a per-record array (the shard stacks ``_SHARD_ROWS`` of them)."""
    inner = list(shape[1:])
    if len(inner) == 1:
        inner[0] = max(1, min(inner[0], _MAX_CHUNK_ELEMS))
    return (1, *[max(1, int(x)) for x in inner])


_INNER_CODECS = {False: ["bytes"], True: ["bytes", "crc32c"]}  # per ``checksums``, inner and index alike


def _codecs(dtype: np.dtype, checksums: bool) -> list[dict[str, Any]]:
    return [_bytes_codec(dtype), *([{"name": "crc32c"}] if checksums else [])]


def _row_array_doc(shape: tuple[int, ...], dtype: np.dtype, checksums: bool = True) -> dict[str, Any]:
    """The ``zarr.json`` of a new per-record array: rows sharded by ``_SHARD_ROWS``, index at the
    start, uncompressed, a CRC32C after each chunk and after the index (``checksums``)."""
    chunk = _chunks_for(shape)
    return _array_doc(
        shape,
        dtype,
        [_SHARD_ROWS, *chunk[1:]],
        [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": list(chunk),
                    "codecs": _codecs(dtype, checksums),
                    "index_codecs": _codecs(np.dtype(np.uint64), checksums),
                    "index_location": "start",
                },
            }
        ],
    )


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
    return {
        "shape": list(shape),
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}},
        "chunk_key_encoding": _CHUNK_KEYS,
        "fill_value": fill,
        "codecs": codecs,
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_run_path(path: str | Path) -> Path:
    """``path`` as a local folder; a URL (``s3://``, ``gs://``, ``file://`` ...) is refused in one line
    (``Path`` would fold it into a relative folder named ``s3:``). Run folders are local today."""
    if isinstance(path, str) and _URL.match(path):
        raise TrajscopeError(
            f"{path} is a URL: trajscope records and reads run folders on a local file system only; "
            "record to a local folder (copy it to or from the object store yourself)"
        )
    return Path(path)


def _check_version(attrs: Mapping[str, Any], path: Path) -> None:
    fmt = attrs.get("format")
    ver = attrs.get("format_version")
    if fmt != FORMAT:
        raise TrajscopeError(f"{path} is not a trajscope trajectory store (format={fmt!r})")
    if isinstance(ver, bool) or ver not in READ_VERSIONS:
        raise TrajscopeError(
            f"{path} has format version {ver}, this trajscope reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}: use the trajscope release that recorded it"
        )


def _version(attrs: Mapping[str, Any], path: Path) -> int:
    """The store's format version, checked to be one trajscope reads."""
    _check_version(attrs, path)
    return int(attrs["format_version"])


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
