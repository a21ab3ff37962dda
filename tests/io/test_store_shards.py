"""Format version 3: per-record arrays in row shards (``sharding_indexed``, index first), a CRC32C
after every chunk and after every shard index.

Checks that go past the round trips of test_store / test_recorder:

* long runs (several shard files per array) read back bit-exactly three independent ways: through
  trajscope's reader, through plain ``zarr``, and straight from the shard files' bytes (index and
  its CRC at the start, row i at ``16 S + 4 + i * (value_bytes + 4)``, each chunk's CRC after its
  values, every CRC recomputed here), for every per-record array;
* restarts and resumes whose rewritten rows start right before, at and after a shard boundary;
* a writer stopped right before one of its writes, or half-way through a data write (what SIGKILL
  leaves on disk: the page cache keeps every completed write), never exposes a half-written row,
  and the store resumes from there (the index rewrite, one write inside the file's first page, is
  all or nothing);
* damage (blank index entry, shard file cut short or deleted) is a one-line TrajscopeError that
  names the array;
* the training-thread writer: records become visible without flush(), its commit timer does not
  race the training thread, and close() leaves no shard file open.

The last tests are regressions for bugs found in review.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import torch
import zarr

import trajscope
from tests.helpers.recording import (
    Ref,
    assert_batch_equal,
    assert_bitexact,
    assert_state_bitexact,
    assert_tensors_bitexact,
    drop_chunks,
    make_model,
    per_record_arrays,
    train,
)
from tests.helpers.scripts import run_script
from trajscope import TrajscopeError
from trajscope.errors import DamagedRecordError
from trajscope.io import files, packing
from trajscope.io import layout as store
from trajscope.io.packing import flatten_batch, make_layout, pack
from trajscope.io.reader import TrajectoryReader
from trajscope.io.records import Snapshot
from trajscope.io.writer import TrajectoryWriter
from trajscope.record import writer_thread as recorder_mod
from trajscope.record.recorder import Recorder

LOSS = torch.nn.MSELoss()
EMPTY = 2**64 - 1
SIZES = (3, 5, 2, 6, 5, 4)  # the first batch fixes the chunk shape; 5 and 6 need two chunks per row


def batches(n: int, seed: int = 7, shift: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        b = SIZES[(t + shift) % len(SIZES)]
        out.append((torch.randn(b, 4, generator=g), torch.randn(b, 3, generator=g)))
    return out


def adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)


def reference(data: list) -> Ref:
    """θ_t, buffers, Adam state, lr and loss before each step of training BufferNet on ``data``."""
    model = make_model("buffers")
    return train(model, adam(model), LOSS, data, ref=Ref())


def trainer_before(data: list, n: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and optimizer in the state right before step ``n`` (trained on ``data[:n]``, no recorder)."""
    model = make_model("buffers")
    opt = adam(model)
    train(model, opt, LOSS, data[:n])
    return model, opt


def record(path: Path, data: list, background: bool, **kw) -> Recorder:
    model = make_model("buffers")
    opt = adam(model)
    with Recorder(path, model, opt, LOSS, export=False, background=background, **kw) as rec:
        train(model, opt, LOSS, data, rec=rec)
    assert rec.failed is None
    return rec


# --------------------------------------------------------------------------- independent readers
def crc(data: bytes) -> bytes:
    """CRC32C as Zarr's crc32c codec appends it (4 bytes, little-endian)."""
    return struct.pack("<I", google_crc32c.value(bytes(data)))


class RawArray:
    """A per-record array decoded straight from its files' bytes, following docs/format.md (neither
    zarr nor trajscope): ``zarr.json`` for the shape, dtype and shard geometry, then each shard's
    index (S pairs of little-endian uint64 offset, nbytes; all ones = never written; then the CRC32C
    of those 16 S bytes) at its start, each chunk its values then their CRC32C. Every CRC is checked."""

    def __init__(self, arr_dir: Path) -> None:
        self.dir = arr_dir
        md = json.loads((arr_dir / "zarr.json").read_text())
        (codec,) = md["codecs"]
        cfg = codec["configuration"]
        assert codec["name"] == "sharding_indexed" and cfg["index_location"] == "start"
        assert [c["name"] for c in cfg["codecs"]] == ["bytes", "crc32c"]
        assert [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]
        shard_shape = md["chunk_grid"]["configuration"]["chunk_shape"]
        assert cfg["chunk_shape"][0] == 1 and shard_shape[1:] == cfg["chunk_shape"][1:]
        self.S = shard_shape[0]
        self.inner = cfg["chunk_shape"][1:]
        self.dtype = np.dtype(md["data_type"]).newbyteorder("<")
        self.shape = md["shape"][1:]
        self.value_bytes = math.prod(self.inner) * self.dtype.itemsize
        self.chunk_bytes = self.value_bytes + 4
        self.index_bytes = 16 * self.S + 4
        self._files: dict[Path, bytes] = {}

    def _file(self, f: Path) -> bytes:
        if f not in self._files:
            self._files[f] = f.read_bytes() if f.is_file() else b""
        return self._files[f]

    def row(self, r: int, extents: list[int] | None = None) -> np.ndarray:
        """Row ``r``. Chunks covering ``extents`` (default: the whole row) must be present with the
        documented index entry and bytes; the others read as 0."""
        need = self.shape if extents is None else [min(int(e), n) for e, n in zip(extents, self.shape)]
        cols = [range(-(-n // c)) for n, c in zip(self.shape, self.inner)]
        out = np.zeros([len(c) * k for c, k in zip(cols, self.inner)], self.dtype)
        for g in itertools.product(*cols):
            required = all(j * c < n for j, c, n in zip(g, self.inner, need))
            data = self._file(self.dir / ".".join(["c", str(r // self.S), *map(str, g)]))
            if data:
                assert data[16 * self.S : self.index_bytes] == crc(data[: 16 * self.S]), (
                    f"{self.dir} row {r}: index CRC"
                )
            off, nb = struct.unpack_from("<QQ", data, 16 * (r % self.S)) if data else (EMPTY, EMPTY)
            if off == EMPTY:
                assert not required, f"{self.dir.name} row {r} chunk {g}: never written"
                continue
            assert (off, nb) == (self.index_bytes + (r % self.S) * self.chunk_bytes, self.chunk_bytes), (
                f"{self.dir} row {r}: index entry {(off, nb)}"
            )
            assert len(data) >= off + nb, f"{self.dir} row {r}: shard file too short"
            values = data[off : off + self.value_bytes]
            assert data[off + self.value_bytes : off + nb] == crc(values), f"{self.dir} row {r}: chunk CRC"
            out[tuple(slice(j * c, (j + 1) * c) for j, c in zip(g, self.inner))] = np.frombuffer(
                values, self.dtype
            ).reshape(self.inner)
        return out[tuple(slice(0, n) for n in self.shape)]


def raw_row(arr_dir: Path, r: int, extents: list[int] | None = None) -> np.ndarray:
    return RawArray(arr_dir).row(r, extents)


def same_bytes(a: np.ndarray, b: np.ndarray, what: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert a.dtype.newbyteorder("<") == b.dtype.newbyteorder("<"), f"{what}: dtype {a.dtype} != {b.dtype}"
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"{what}: values differ"


def tensor_bytes(t: torch.Tensor | float) -> bytes:
    t = t if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float64)
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check_store(run_dir: Path, ref: Ref, data: list, boundary_rows: Any = (), first: int = 0) -> None:
    """Every committed row (from ``first`` on) of every per-record array: plain zarr == the shard
    bytes == the reference, and trajscope's reader == the reference at ``boundary_rows``."""
    spath = run_dir / store.STORE_NAME
    arrays = per_record_arrays(spath)
    root = zarr.open_group(str(spath), mode="r", use_consolidated=False)
    n = root["commit"].attrs["records"]
    assert n == len(data)
    attrs = dict(root.attrs)
    # one zarr read per array, across all its shard files
    whole = {name: a[first:n] for name, a in arrays.items() if name != "skipped"}
    records = arrays["records"][:n]
    same_bytes(records[:, 0], np.arange(n, dtype=np.float64), "records.step")
    same_bytes(records[:, 1], np.array(ref.losses[:n]), "records.loss")
    same_bytes(records[:, 2], np.array([len(y) for _, y in data], dtype=np.float64), "records.batch_size")
    assert {
        "records",
        "hparams",
        "params/float32",
        "buffers/float32",
        "buffers/int64",
        "buffers/bool",
        "state/0/float32",
        "batch/.0",
        "batch/.1",
    } <= set(whole), sorted(whole)
    layouts = [[packing.Slot.from_json(s) for s in lay] for lay in attrs["state_layouts"]]
    raw = {name: RawArray(spath / name) for name in whole}
    for r in range(first, n):
        i = r - first
        lid = int(records[r, 3])
        b = int(records[r, 2])
        for name, rows in whole.items():
            if name.startswith("state/") and int(name.split("/")[1]) != lid:
                continue  # this record used another state layout (or none)
            extents = None
            if name.startswith("batch/"):
                leaf = data[r][int(name.split(".")[1])]
                extents = list(leaf.shape)
                same_bytes(rows[i][:b], leaf.numpy(), f"zarr {name}[{r}]")
            if name.startswith("batch_shape/"):
                leaf = data[r][int(name.split(".")[1])]
                same_bytes(rows[i], np.array(leaf.shape, dtype=np.int64), f"zarr {name}[{r}]")
            if extents is None:
                same_bytes(raw[name].row(r), rows[i], f"raw vs zarr {name}[{r}]")
            else:
                region = tuple(slice(0, e) for e in extents)
                same_bytes(raw[name].row(r, extents)[region], rows[i][region], f"raw vs zarr {name}[{r}]")
        # semantics of the packed rows, against the reference (not through trajscope's unpack)
        for s in (packing.Slot.from_json(j) for j in attrs["params"]):
            assert whole[f"params/{s.pack}"][i, s.offset : s.offset + s.numel].tobytes() == tensor_bytes(
                ref.params[r][s.name]
            ), f"params {s.name}[{r}]"
        for s in (packing.Slot.from_json(j) for j in attrs["buffers"]):
            want = ref.buffers[r][s.name]
            got = whole[f"buffers/{s.pack}"][i, s.offset : s.offset + s.numel]
            assert got.tobytes() == tensor_bytes(want), f"buffers {s.name}[{r}]"
        if lid < 0:
            assert not ref.state[r], f"state of row {r}"
        else:
            for s in layouts[lid]:
                pname, _, key = s.name.rpartition("/")
                got = whole[f"state/{lid}/{s.pack}"][i, s.offset : s.offset + s.numel]
                assert got.tobytes() == tensor_bytes(ref.state[r][pname][key]), f"state {s.name}[{r}]"
        lr_col = attrs["hparam_names"].index("lr")
        assert whole["hparams"][i, 0, lr_col] == ref.lrs[r][0]
    run = trajscope.open_run(run_dir)
    assert list(run.steps) == list(range(n))
    for t in sorted({t for t in boundary_rows if t < n} | {first, n - 1}):
        ck = run.checkpoint(t)
        assert_tensors_bitexact(ck.params, ref.params[t], f"theta_{t}")
        assert_tensors_bitexact(ck.buffers, ref.buffers[t], f"buffers_{t}")
        assert_state_bitexact(ck.optimizer_state, ref.state[t], f"state_{t}")
        assert_batch_equal(ck.batch, data[t], f"batch_{t}")
        assert ck.loss == ref.losses[t]


def open_store_files(path: Path) -> list[str]:
    """Files under ``path`` that this process holds open."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            out.append(target)
    return out


# --------------------------------------------------------------------------- long runs
BOUNDARY_ROWS = (62, 63, 64, 65, 127, 128, 129, 130)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "thread"])
def test_131_records_read_back_through_zarr_bytes_and_reader(tmp_path, background):
    """131 records every=1 (three shard files per array, rows 0-63, 64-127, 128-130), batch sizes
    growing past the first chunk: every row of every array is the same through plain zarr, the raw
    shard bytes, trajscope's reader and the reference; close() leaves no shard file open."""
    assert store._SHARD_ROWS == 64
    data = batches(131)
    ref = reference(data)
    rec = record(tmp_path / "run", data, background)
    assert rec.writer._files == {}
    assert open_store_files(tmp_path) == []
    spath = tmp_path / "run" / store.STORE_NAME
    assert sorted(p.name for p in (spath / "params" / "float32").iterdir()) == ["c.0.0", "c.1.0", "c.2.0", "zarr.json"]
    # batch/.0 holds (B=6, 4) rows in chunks of the first batch (3 rows): two chunk columns
    assert {p.name for p in (spath / "batch" / ".0").iterdir()} == {
        f"c.{s}.{j}.0" for s in range(3) for j in range(2)
    } | {"zarr.json"}
    # a partly filled last shard: index and its CRC, then exactly 3 rows, each its values and their CRC
    arr = per_record_arrays(spath)["params/float32"]
    row_bytes = arr.shape[1] * 4 + 4
    shard = (spath / "params" / "float32" / "c.2.0").read_bytes()
    assert len(shard) == 16 * 64 + 4 + 3 * row_bytes
    idx = np.frombuffer(shard[: 16 * 64], "<u8").reshape(64, 2)
    assert idx[:3].tolist() == [[16 * 64 + 4 + i * row_bytes, row_bytes] for i in range(3)]
    assert (idx[3:] == EMPTY).all()
    assert shard[16 * 64 : 16 * 64 + 4] == crc(shard[: 16 * 64])
    for i in range(3):
        off = 16 * 64 + 4 + i * row_bytes
        assert shard[off + row_bytes - 4 : off + row_bytes] == crc(shard[off : off + row_bytes - 4])
    check_store(tmp_path / "run", ref, data, BOUNDARY_ROWS)


def test_restarts_rewrite_rows_at_real_shard_boundaries(tmp_path):
    """Restarts at steps 128, 127, 64, 63 of a 131-record run (64-row shards): the rows from
    the restart on are rewritten in place with another trajectory (other batches, other sizes),
    the earlier ones are untouched, and the store reads back exactly both ways."""
    path = tmp_path / "run"
    base = batches(131)
    record(path, base, background=False)
    expected_restarts = []
    for i, at in enumerate((128, 127, 64, 63)):
        other = batches(131, seed=100 + i, shift=i + 1)
        data = base[:at] + other[at:]
        model, opt = trainer_before(data, at)
        with Recorder(path, model, opt, LOSS, export=False, background=False, resume=True, step=at) as rec:
            assert rec.step == at
            train(model, opt, LOSS, data[at:], rec=rec)
        assert rec.failed is None and rec.writer._files == {}
        expected_restarts.append((at, 131 - at))
        run = trajscope.open_run(path)
        assert [(x["at_step"], x["dropped_records"]) for x in run.restarts] == expected_restarts
        check_store(path, reference(data), data, (at - 1, at), first=at - 2)
    check_store(path, reference(data), data, BOUNDARY_ROWS)  # and all rows of the last trajectory
    assert open_store_files(tmp_path) == []


def test_restart_reads_records_without_zarr_threads(tmp_path):
    """A restart reads the recorded steps straight from the shard files (across a shard boundary):
    the resumed training process starts no zarr event-loop or pool thread."""

    path = tmp_path / "run"
    data = batches(70)
    record(path, data, background=False)
    done = run_script(Path(__file__).parent / "resume_child.py", str(path), str(Path(__file__).parent), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['MainThread']"
    run = trajscope.open_run(path)
    assert [(x["at_step"], x["dropped_records"]) for x in run.restarts] == [(66, 4)]
    check_store(path, reference(data), data, (63, 64, 65, 66, 69))


def test_restart_on_a_truncated_records_shard_refuses_without_changes(tmp_path):
    path = tmp_path / "run"
    data = batches(5)
    record(path, data, background=False)
    shard = path / store.STORE_NAME / "records" / "c.0.0"
    shard.write_bytes(shard.read_bytes()[:-8])  # the last record's chunk cut short
    before = (path / store.STORE_NAME / "commit" / "zarr.json").read_bytes()
    model, opt = trainer_before(data, 2)
    with pytest.raises(TrajscopeError, match="row 4 of records is damaged .its shard file is cut short"):
        Recorder(path, model, opt, LOSS, export=False, background=False, resume=True, step=2)
    assert (path / store.STORE_NAME / "commit" / "zarr.json").read_bytes() == before


@pytest.mark.parametrize("background,at", [(False, 3), (False, 4), (False, 5), (True, 8)])
def test_restart_and_resume_around_small_shards(tmp_path, monkeypatch, background, at):
    """Shards of 4 rows: a restart at ``at`` (right before, at, after a shard boundary) rewrites the
    later rows and records past the next boundary; a plain resume then appends behind them."""
    monkeypatch.setattr(store, "_SHARD_ROWS", 4)
    path = tmp_path / "run"
    base = batches(10)
    record(path, base, background)
    assert sorted(p.name for p in (path / store.STORE_NAME / "records").iterdir()) == [
        "c.0.0",
        "c.1.0",
        "c.2.0",
        "zarr.json",
    ]
    other = batches(14, seed=55, shift=2)
    data = base[:at] + other[at:]
    model, opt = trainer_before(data, at)
    with Recorder(path, model, opt, LOSS, export=False, background=background, resume=True, step=at) as rec:
        train(model, opt, LOSS, data[at:12], rec=rec)
    assert rec.failed is None
    run = trajscope.open_run(path)
    assert [(x["at_step"], x["dropped_records"]) for x in run.restarts] == [(at, 10 - at)]
    check_store(path, reference(data[:12]), data[:12], (at - 1, at, at + 1, 11))
    # a plain resume (no step): continues at 12, in the shard that row 11 left open
    with Recorder(path, model, opt, LOSS, export=False, background=background, resume=True) as rec:
        assert rec.step == 12
        train(model, opt, LOSS, data[12:14], rec=rec)
    check_store(path, reference(data), data, (11, 12, 13))
    assert len(trajscope.open_run(path).restarts) == 1
    assert open_store_files(tmp_path) == []


# --------------------------------------------------------------------------- kills
class Killed(BaseException):
    """The process died here (a BaseException: nothing in trajscope catches it)."""


class _KillingOs:
    """Stands in for ``os`` inside trajscope.io.files: dies right before the k-th write-like call
    (pwrite, pwritev, replace, rename). With ``partial``, a data write writes half of its bytes
    first (SIGKILL can stop a long write between pages; this is pessimistic for short ones). The
    shard index rewrite (offset 0, inside the first page) is all or nothing, as it is under SIGKILL:
    the kernel copies a single page whole or not at all."""

    def __init__(self, k: int, partial: bool) -> None:
        self.k, self.partial, self.calls = k, partial, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def _tick(self) -> bool:
        self.calls += 1
        return self.calls == self.k

    def pwrite(self, fd, data, offset):
        if self._tick():
            if self.partial and len(data) > 16 and not (offset == 0 and len(data) <= 4096):
                os.pwrite(fd, bytes(data)[: len(data) // 2], offset)
            raise Killed
        return os.pwrite(fd, data, offset)

    def pwritev(self, fd, buffers, offset):
        if self._tick():
            if self.partial:
                joined = b"".join(bytes(b) for b in buffers)
                os.pwrite(fd, joined[: len(joined) // 2], offset)
            raise Killed
        return os.pwritev(fd, buffers, offset)

    def replace(self, a, b):
        if self._tick():
            raise Killed
        return os.replace(a, b)

    def rename(self, a, b):
        if self._tick():
            raise Killed
        return os.rename(a, b)


def _kill_meta(layout: list) -> dict:
    return {
        "params": [s.to_json() for s in layout],
        "buffers": [],
        "hparam_names": ["lr"],
        "hparam_bools": [],
        "cadence": {"every": 1, "window": 1},
        "optimizer": {"class": "torch.optim.sgd.SGD", "name": "SGD", "groups": [{"params": [s.name for s in layout]}]},
        "model": {"spec": None, "kwargs": {}, "exported": None, "export_error": "none", "node_layers": []},
        "loss": None,
    }


def _kill_snapshot(step: int, layout: list) -> Snapshot:
    g = torch.Generator().manual_seed(step)
    tensors = [torch.randn(7, generator=g), torch.randn(2, 3, generator=g, dtype=torch.float64)]
    b = (2, 5, 3)[step % 3]
    spec, leaves = flatten_batch((torch.randn(b, 2, generator=g), torch.tensor(float(step))))
    return Snapshot(
        step=step,
        loss=step / 7,
        params=pack(layout, tensors),
        buffers={},
        hparams=np.array([[0.1 * step]]),
        state_layout=None,
        state={},
        batch_spec=spec,
        batch=leaves,
    )


def _check_kill_store(run_dir: Path, layout: list, n: int, through_reader: Any = (), first: int = 0) -> None:
    """The store holds exactly rows 0..n-1, each (from ``first`` on) complete and exact in its shard
    files; trajscope's reader opens it and reads the rows ``through_reader`` (zarr reads are slow)."""
    r = TrajectoryReader(run_dir)
    assert r.n_records == n and list(r.steps) == list(range(n)) and list(r.losses) == [t / 7 for t in range(n)]
    spath = run_dir / store.STORE_NAME
    raw = (
        {name: RawArray(spath / name) for name in ("params/float32", "params/float64", "batch/.0", "batch/.1")}
        if n
        else {}
    )
    for t in range(first, n):
        want = _kill_snapshot(t, layout)
        x, y = want.batch[0][1], want.batch[1][1]
        assert raw["params/float32"].row(t).tobytes() == tensor_bytes(want.params["float32"]), f"w@{t}"
        assert raw["params/float64"].row(t).tobytes() == tensor_bytes(want.params["float64"]), f"v@{t}"
        assert raw["batch/.0"].row(t, list(x.shape))[: len(x)].tobytes() == tensor_bytes(x), f"x@{t}"
        assert raw["batch/.1"].row(t).tobytes() == tensor_bytes(y), f"y@{t}"
        r._read_row("params/float32", t)  # raises on a missing or cut chunk
        r._read_row("batch/.0", t, list(x.shape))
        if t in through_reader:
            got = r.params(t)
            assert tensor_bytes(got["w"]) == tensor_bytes(want.params["float32"])
            assert tensor_bytes(got["v"]) == tensor_bytes(want.params["float64"])
            assert_batch_equal(r.batch(t), (x, y), f"batch_{t}")


def _write_kill_run(run_dir: Path, layout: list, progress: list[int]) -> None:
    """6 records (shards of 4 rows, the batch grows at record 1, shard 1 starts at record 4), a
    commit after records 1, 3 and 5; ``progress`` gets the number of committed records."""
    w = TrajectoryWriter(run_dir, _kill_meta(layout))
    try:
        for t in range(6):
            w.append(_kill_snapshot(t, layout), commit=False)
            if t % 2 == 1:
                w.commit()
                progress.append(t + 1)
    finally:
        w.close()  # (closing writes nothing: a dead process's descriptors close too)


def test_writer_stopped_at_any_write_leaves_committed_rows_intact(tmp_path, monkeypatch):
    """Stop the writer right before one of its writes (and, for a data write, after half of its
    bytes): the committed rows read back exactly, nothing else is visible, and resuming rewrites the
    uncommitted rows and continues into the next shard. Every write of record 4 (the first row of
    shard 1: new shard files) is a stop point, and every 12th write elsewhere."""
    monkeypatch.setattr(store, "_SHARD_ROWS", 4)
    layout = make_layout([("w", torch.zeros(7)), ("v", torch.zeros(2, 3, dtype=torch.float64))])
    # where each record's writes start
    counter = _KillingOs(0, partial=False)
    marks = []
    real_append = TrajectoryWriter.append

    def marking_append(self, *a, **k):
        marks.append(counter.calls)
        return real_append(self, *a, **k)

    monkeypatch.setattr(TrajectoryWriter, "append", marking_append)
    monkeypatch.setattr(files, "os", counter)
    _write_kill_run(tmp_path / "whole", layout, [])
    monkeypatch.setattr(files, "os", os)
    monkeypatch.setattr(TrajectoryWriter, "append", real_append)
    total = counter.calls
    assert len(marks) == 6 and total > 100
    points = sorted(set(range(marks[4] + 1, marks[5] + 1)) | set(range(1, total + 1, 12)) | {total})
    outcomes = set()
    for k in points:
        run_dir = tmp_path / f"k{k}"
        progress = [0]
        monkeypatch.setattr(files, "os", _KillingOs(k, partial=True))
        with pytest.raises(Killed):
            _write_kill_run(run_dir, layout, progress)
        monkeypatch.setattr(files, "os", os)
        if not store.is_run(run_dir):
            assert k <= 3  # killed while the empty store was being made
            continue
        n = progress[-1]
        outcomes.add(n)
        _check_kill_store(run_dir, layout, n, through_reader={n - 1} if k % 2 else ())
        # resume: the rows after the commit marker are rewritten, the store goes on
        w = TrajectoryWriter(run_dir, resume=True)
        for t in range(n, 9):
            w.append(_kill_snapshot(t, layout), commit=False)
        w.commit()
        w.close()
        assert not list(run_dir.rglob("*.partial"))
        _check_kill_store(run_dir, layout, 9, through_reader=() if k % 9 else set(range(9)), first=n if k % 9 else 0)
    assert outcomes == {0, 2, 4} and len(points) > 30


# --------------------------------------------------------------------------- damage
# --------------------------------------------------------------------------- damage
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """10 records in shards of 4 rows (Adam: state from step 1 on)."""
    path = tmp_path_factory.mktemp("shards") / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(store, "_SHARD_ROWS", 4)
    try:
        record(path, batches(10), background=False)
    finally:
        mp.undo()
    return path


READERS = {
    "params/float32": lambda r, t: r.params(t),
    "state/0/float32": lambda r, t: r.state(t),
    "hparams": lambda r, t: r.hparams(t),
    "batch/.0": lambda r, t: r.batch(t),
    "batch_shape/.0": lambda r, t: r.batch(t),
}


@pytest.mark.parametrize("damage", ["blank_index_entry", "cut_short", "shard_deleted"])
@pytest.mark.parametrize("array", sorted(READERS))
def test_damaged_shard_is_a_one_line_error_naming_the_array(small_run, tmp_path, array, damage):
    """Row 5 (second row of shard 1) loses its chunk: reading it raises a one-line DamagedRecordError
    naming the array, the step and what is wrong (never zeros); the rows the damage did not reach
    still read."""
    import shutil

    path = tmp_path / "run"
    shutil.copytree(small_run, path)
    arr = per_record_arrays(path / store.STORE_NAME)[array]
    shard = path / store.STORE_NAME / array / arr.metadata.encode_chunk_key((1, *[0] * (arr.ndim - 1)))
    assert shard.is_file()
    index = 16 * 4 + 4  # 4 entries and their CRC
    if damage == "blank_index_entry":
        assert drop_chunks(path, array, 5)
        intact, problem = [4, 6], "its chunk is missing"
    elif damage == "cut_short":
        size = shard.stat().st_size
        chunk = (size - index) // 4  # the shard holds all 4 rows (4..7)
        with open(shard, "r+b") as f:
            f.truncate(index + chunk + chunk // 2)  # half of row 5's chunk
        intact, problem = [4], "its shard file is cut short"
    else:
        shard.unlink()
        intact, problem = [], f"shard file {shard.name} is missing"
    fresh = TrajectoryReader(path)
    read = READERS[array]
    with pytest.raises(DamagedRecordError) as e:
        read(fresh, 5)
    msg = str(e.value)
    assert "\n" not in msg and f"step 5 of {array} is damaged ({problem}, the store was truncated)" in msg, msg
    assert (e.value.step, e.value.array) == (5, array)
    for t in intact + [3, 8]:
        read(fresh, t)


@pytest.mark.parametrize("damage", ["blank_index_entry", "cut_short"])
def test_damaged_records_or_skipped_fail_at_open(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(store, "_SHARD_ROWS", 4)
    layout = make_layout([("w", torch.zeros(7)), ("v", torch.zeros(2, 3, dtype=torch.float64))])
    for array in ("records", "skipped"):
        run_dir = tmp_path / array
        w = TrajectoryWriter(run_dir, _kill_meta(layout))
        for t in range(6):
            w.append(_kill_snapshot(t, layout), commit=False)
            w.skip(100 + t, commit=False)
        w.commit()
        w.close()
        _check_kill_store(run_dir, layout, 6, through_reader={5})
        assert list(TrajectoryReader(run_dir).skipped) == list(range(100, 106))
        shard = run_dir / store.STORE_NAME / array / ("c.1.0" if array == "records" else "c.1")
        if damage == "blank_index_entry":
            assert drop_chunks(run_dir, array, 5) == [shard]
            row = 5
        else:
            with open(shard, "r+b") as f:
                f.truncate(16 * 4 + 4 + 4)  # the index and its CRC, then 4 bytes of row 4
            row = 4
        with pytest.raises(TrajscopeError) as e:
            TrajectoryReader(run_dir)
        msg = str(e.value)
        assert "\n" not in msg and f"row {row} of {array} is damaged" in msg and "cannot be opened" in msg, msg
        assert not isinstance(e.value, DamagedRecordError)  # every record needs it: the store is unreadable


# --------------------------------------------------------------------------- 0-d and empty rows
def test_zero_size_and_scalar_rows_in_shards(tmp_path, monkeypatch):
    """An empty parameter pack, 0-d parameters, 0-d batch leaves and `skipped` (0-d rows) across
    several 4-row shards: trajscope and plain zarr read them back exactly."""
    monkeypatch.setattr(store, "_SHARD_ROWS", 4)
    items = [
        ("w", torch.zeros(3)),
        ("empty", torch.zeros(0, dtype=torch.float64)),
        ("half", torch.zeros((), dtype=torch.float16)),
        ("bf", torch.zeros(2, dtype=torch.bfloat16)),
    ]
    layout = make_layout(items)
    meta = _kill_meta(layout)
    w = TrajectoryWriter(tmp_path, meta)
    given = []
    for t in range(10):
        g = torch.Generator().manual_seed(t)
        tensors = [
            torch.randn(3, generator=g),
            torch.zeros(0, dtype=torch.float64),
            torch.randn((), generator=g).to(torch.float16),
            torch.randn(2, generator=g).to(torch.bfloat16),
        ]
        batch = (torch.randn(2, 2, generator=g), torch.tensor(t, dtype=torch.int64))  # 0-d targets
        spec, leaves = flatten_batch(batch)
        w.append(
            Snapshot(
                step=t,
                loss=float(t),
                params=pack(layout, tensors),
                buffers={},
                hparams=np.array([[0.5]]),
                state_layout=None,
                state={},
                batch_spec=spec,
                batch=leaves,
            ),
            commit=t % 3 == 0,
        )
        w.skip(1000 + t, commit=False)
        given.append((tensors, batch))
    w.commit()
    w.close()
    r = TrajectoryReader(tmp_path)
    assert list(r.steps) == list(range(10)) and list(r.skipped) == list(range(1000, 1010))
    arrays = per_record_arrays(tmp_path / store.STORE_NAME)
    assert arrays["params/float64"].shape[1:] == (0,) and arrays["skipped"].shape[1:] == ()
    same_bytes(arrays["skipped"][:10], np.arange(1000, 1010, dtype=np.int64), "zarr skipped")
    same_bytes(arrays["batch/.1"][:10], np.arange(10, dtype=np.int64), "zarr 0-d targets")
    for t, (tensors, batch) in enumerate(given):
        got = r.params(t)
        for (name, _), want in zip(items, tensors):
            if want.numel():
                assert_bitexact(got[name], want, f"{name}@{t}")
            else:
                assert got[name].shape == want.shape and got[name].dtype == want.dtype, name
        assert_batch_equal(r.batch(t), batch, f"batch_{t}")
        same_bytes(
            raw_row(tmp_path / store.STORE_NAME / "skipped", t), np.array(1000 + t, dtype=np.int64), "raw skipped"
        )
        same_bytes(
            raw_row(tmp_path / store.STORE_NAME / "params" / "float16", t), tensors[2].reshape(1).numpy(), "raw float16"
        )
        assert arrays["params/bfloat16"][t].tobytes() == tensor_bytes(tensors[3])


# --------------------------------------------------------------------------- the training-thread writer
def test_inline_records_visible_without_flush_and_close_releases_files(tmp_path):
    """Written on the training thread: the first record is committed at once, the next ones by the
    timer within ~0.5 s with no flush() and no further step; close() closes every shard file."""
    data = batches(5)
    ref = reference(data)
    model = make_model("buffers")
    opt = adam(model)
    rec = Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False)
    try:
        assert rec.background is False and rec._thread is None
        train(model, opt, LOSS, data, rec=rec)
        done = time.monotonic()
        assert rec.writer._files and open_store_files(tmp_path)  # kept open between records
        while len(trajscope.open_run(tmp_path / "run")) < 5 and time.monotonic() - done < 5:
            time.sleep(0.02)
        assert time.monotonic() - done < 2.0  # the timer's 0.25 s, with room for a loaded CI machine
        assert list(trajscope.open_run(tmp_path / "run").steps) == [0, 1, 2, 3, 4]
    finally:
        rec.close()
    assert rec.writer._files == {} and open_store_files(tmp_path) == []
    assert rec._timer is None
    check_store(tmp_path / "run", ref, data, (2, 3))


def test_inline_commit_timer_against_training_readers_and_flush(tmp_path, monkeypatch):
    """Commit timer firing all the time (interval 1 ms), flush() from another thread and a reader
    polling the store while the training thread writes: every record any reader sees is complete
    and exact, and the final store holds every step."""
    monkeypatch.setattr(recorder_mod, "_COMMIT_INTERVAL", 0.001)
    monkeypatch.setattr(store, "_SHARD_ROWS", 4)
    data = batches(40)
    ref = reference(data)
    model = make_model("buffers")
    opt = adam(model)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def poll():
        try:
            while not stop.is_set():
                r = TrajectoryReader(tmp_path / "run")
                n = r.n_records
                seen.append(n)
                if n:
                    t = n - 1  # the newest committed record is complete
                    assert_tensors_bitexact(r.params(t), ref.params[t], f"theta_{t}")
                    x = data[t][0]
                    got = RawArray(tmp_path / "run" / store.STORE_NAME / "batch" / ".0").row(t, list(x.shape))
                    assert got[: len(x)].tobytes() == tensor_bytes(x), f"batch_{t}"
        except BaseException as e:  # reported on the main thread
            errors.append(e)

    def flusher():
        try:
            while not stop.is_set():
                rec.flush()
                time.sleep(0.002)
        except BaseException as e:
            errors.append(e)

    rec = Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False)
    threads = [threading.Thread(target=poll), threading.Thread(target=flusher)]
    for th in threads:
        th.start()
    try:
        for x, y in data:
            loss = LOSS(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()
            time.sleep(0.0005)
    finally:
        stop.set()
        for th in threads:
            th.join()
        rec.close()
    assert not errors, errors
    assert rec.failed is None and max(seen) >= 1
    assert seen == sorted(seen)  # the marker never goes back
    check_store(tmp_path / "run", ref, data, (3, 4, 39))


def _commit_timers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]


def test_close_leaves_no_commit_timer_thread(tmp_path):
    """A daemon timer thread still waking while the interpreter finalises can abort the process
    (SIGABRT, seen in CI): close() cancels the timer and waits for its thread."""
    data = batches(3)
    model = make_model("buffers")
    opt = adam(model)
    rec = Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False)
    train(model, opt, LOSS, data, rec=rec)
    assert _commit_timers()  # the last records wait for the timer
    rec.close()
    assert rec._timer is None and _commit_timers() == []
    check_store(tmp_path / "run", reference(data), data)


def test_timer_firing_after_close_does_not_rearm(tmp_path):
    """The race behind that abort: the timer fires while close() holds the lock and gets the lock
    after close() is done. It must not start a new timer (training looked recent, so it used to),
    because nothing would cancel that one."""
    data = batches(2)
    model = make_model("buffers")
    opt = adam(model)
    rec = Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False)
    train(model, opt, LOSS, data, rec=rec)
    rec.close()
    rec._last_step_time = time.monotonic() + 60  # "training is running": the timer would re-arm
    rec._commit_tail(True)  # what the timer thread runs once it has the lock
    assert rec._timer is None and _commit_timers() == []
    check_store(tmp_path / "run", reference(data), data)


def test_default_placement_writes_inline_when_no_core_is_free(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(recorder_mod.torch, "get_num_threads", lambda: 2)
    data = batches(3)
    model = make_model("buffers")
    opt = adam(model)
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False) as rec:
        assert rec.background is False and rec._thread is None
        train(model, opt, LOSS, data, rec=rec)
    check_store(tmp_path / "run", reference(data), data)


# --------------------------------------------------------------------------- bugs found in review
def test_inline_training_thread_failure_keeps_written_records(tmp_path):
    data = batches(4)
    model = make_model("buffers")
    opt = adam(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False)
        train(model, opt, LOSS, data[:3], rec=rec)
        rec.batch(object(), None)  # TypeError on the training thread: recording stops
        rec.close()
    assert rec.failed and rec.n_recorded == 3
    assert len(trajscope.open_run(tmp_path / "run")) == 3


def test_restart_record_without_batch_has_no_batch(tmp_path):
    path = tmp_path / "run"
    data = batches(3)
    record(path, data, background=False)
    model, opt = trainer_before(data, 1)
    with Recorder(path, model, opt, LOSS, export=False, background=False, resume=True, step=1):
        for x, y in data[1:3]:
            loss = LOSS(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()  # no rec.batch(): these records have no batch
    run = trajscope.open_run(path)
    assert list(run.steps) == [0, 1, 2]
    assert run.checkpoint(1).batch is None


def test_open_shard_files_do_not_grow_with_the_batch_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(b, 4, generator=g), torch.randn(b, 3, generator=g)) for b in (1, 64, 64)]
    model = make_model("buffers")
    opt = adam(model)
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False) as rec:
        train(model, opt, LOSS, data, rec=rec)
        assert len(open_store_files(tmp_path)) <= 32


def test_reader_opened_while_records_commit_describes_them(tmp_path, monkeypatch):
    data = batches(2)
    ref = reference(data)
    model = make_model("buffers")
    opt = adam(model)
    rec = Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False)
    real_check = store._check_version

    def check_then_record(attrs, path):
        real_check(attrs, path)  # the reader has read the root attributes here
        train(model, opt, LOSS, data, rec=rec)  # record 0 (first batch), record 1 (first Adam state)
        rec.flush()

    monkeypatch.setattr(store, "_check_version", check_then_record)
    try:
        r = TrajectoryReader(tmp_path / "run")
    finally:
        monkeypatch.undo()
        rec.close()
    assert r.n_records == 2
    assert_batch_equal(r.batch(0), data[0], "batch_0")
    assert_state_bitexact(r.state(1), ref.state[1], "state_1")
