"""Review of TrajectoryReader's direct shard reads (``_read_row``, ``_row_layout``, ``_row_extents``,
``_check_chunks``): every committed row must be exactly what plain ``zarr`` decodes from the same
store (dtype, shape, bytes), for every dtype and geometry the writer produces, and damage must be a
one-line TrajscopeError naming the array.

Tests marked "Regression test" failed before the fixes this review led to.
"""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import trajscope
from trajscope import TrajscopeError
from trajscope.io import trajectory as store
from trajscope.record.recorder import Recorder
from trajscope.io.trajectory import Snapshot, TrajectoryReader, TrajectoryWriter, flatten_batch, make_layout, pack

from tests.helpers.recording import assert_batch_equal, assert_bitexact, make_model, per_record_arrays, reseal_index, train

LOSS = torch.nn.MSELoss()
EMPTY = 2**64 - 1


# --------------------------------------------------------------------------- helpers
def _meta(layout):
    return {"params": [s.to_json() for s in layout], "buffers": [], "hparam_names": ["lr", "momentum"],
            "hparam_bools": [], "cadence": {"every": 1, "window": 1},
            "optimizer": {"class": "torch.optim.sgd.SGD", "name": "SGD",
                          "groups": [{"params": [s.name for s in layout]}]},
            "model": {"spec": None, "kwargs": {}, "exported": None, "export_error": "none", "node_layers": []},
            "loss": None}


def _same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype.newbyteorder("=") == want.dtype.newbyteorder("="), f"{what}: dtype {got.dtype} != {want.dtype}"
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), f"{what}: bytes differ"


def _rows_agree_with_zarr(run_dir: Path) -> int:
    """trajscope's direct row read == plain zarr's decode, for every committed row of every
    per-record array (batch leaves: their own corner, given by batch_shape). Returns rows checked."""
    spath = run_dir / store.STORE_NAME
    r = TrajectoryReader(run_dir)
    arrays = per_record_arrays(spath)
    checked = 0
    for name, arr in sorted(arrays.items()):
        n = len(r.skipped) if name == "skipped" else r.n_records
        whole = arr[:n]                                   # one zarr read per array
        for row in range(n):
            if name.startswith("state/") and int(r._records[row, 3]) != int(name.split("/")[1]):
                continue                                  # the row used another optimizer-state layout
            if name.startswith("batch") and r._records[row, 2] < 0:
                continue                                  # the record has no batch
            extents = None
            if name.startswith("batch/") and f"batch_shape/{name[6:]}" in arrays:
                extents = [int(e) for e in arrays[f"batch_shape/{name[6:]}"][row]]
            want = whole[row]
            if extents is not None:
                want = want[tuple(slice(0, e) for e in extents)]
            got = r._read_row(name, row, extents)
            _same(got, want, f"{name}[{row}]")
            checked += 1
    return checked


def _equal(got, want, what: str) -> None:
    """assert_batch_equal / assert_bitexact that also accept empty tensors (shape and dtype only)."""
    if torch.is_tensor(want) and want.numel() == 0:
        assert torch.is_tensor(got) and got.shape == want.shape and got.dtype == want.dtype, what
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), what
        for k in want:
            _equal(got[k], want[k], f"{what}[{k}]")
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want), what
        for i, (a, b) in enumerate(zip(got, want)):
            _equal(a, b, f"{what}[{i}]")
    else:
        assert_batch_equal(got, want, what)


def _special(dtype: torch.dtype, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) if len(shape) else 1
    if dtype == torch.bool:
        t = torch.rand(n, generator=g) > 0.5
    elif dtype.is_complex:
        t = torch.randn(n, generator=g, dtype=dtype)
        if n >= 3:
            t[:3] = torch.tensor([complex(float("nan"), -0.0), complex(float("inf"), 1.0), complex(-0.0, -float("inf"))],
                                 dtype=dtype)
    elif dtype.is_floating_point:
        t = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        fi = torch.finfo(dtype)
        sp = torch.tensor([-0.0, float("nan"), float("inf"), fi.tiny / 4, fi.max, fi.min], dtype=torch.float64).to(dtype)
        t[:min(n, 6)] = sp[:min(n, 6)]
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -2**31), min(info.max, 2**31 - 1), (n,), generator=g, dtype=torch.int64).to(dtype)
        if n >= 2:
            t[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return t.reshape(shape)


PARAM_SPECS = [("b", torch.bool, (40,)), ("i8", torch.int8, (5, 7)), ("u8", torch.uint8, (3,)),
               ("i16", torch.int16, (2, 2)), ("i32", torch.int32, (17,)), ("i64", torch.int64, ()),
               ("f16", torch.float16, (33,)), ("bf16", torch.bfloat16, (20,)), ("f32", torch.float32, (2, 3)),
               ("f64", torch.float64, (0,)), ("c64", torch.complex64, (9,)), ("c128", torch.complex128, (4,)),
               ("f32b", torch.float32, ()), ("bf16b", torch.bfloat16, (3, 3))]
# batch size and sequence length per record: the first fixes the chunk shape, later ones grow past it
# (several chunk columns per row), shrink, and a 0-size batch
BATCH_GEOM = [(3, 2), (5, 4), (2, 1), (6, 5), (0, 3), (1, 2), (4, 4), (6, 1), (3, 5), (2, 2), (5, 3)]


def _batch(t: int):
    b, T = BATCH_GEOM[t]
    x = {"f16": _special(torch.float16, (b, 3), 100 + t), "bf": _special(torch.bfloat16, (b,), 200 + t),
         "mask": _special(torch.bool, (b, T), 300 + t), "i8": _special(torch.int8, (b,), 400 + t),
         "c": _special(torch.complex64, (b, 2), 500 + t), "s": torch.tensor(t, dtype=torch.int64),
         "h": _special(torch.float16, (), 600 + t)}
    return x, _special(torch.float32, (b, T, 2), 700 + t)


# --------------------------------------------------------------------------- direct rows == zarr
def test_rows_of_every_dtype_and_geometry_match_plain_zarr(tmp_path, monkeypatch):
    """bool, int8, uint8, int16, int32, int64, float16, bfloat16, float32, float64 (empty),
    complex64/128 and 0-d slots in packed rows split over several chunk columns (4 Mi -> 16
    elements), 4-row shards, batch leaves of those dtypes whose shape varies per step (grows past
    the first chunk, shrinks, 0-size), 0-d leaves, records without a batch and skips: trajscope's
    direct read of every row equals plain zarr's, and the round trip is bit-exact."""
    monkeypatch.setattr(store, "_MAX_CHUNK_ELEMS", 16)
    monkeypatch.setattr(store, "_SHARD_ROWS", 4)
    layout = make_layout([(n, torch.zeros(s, dtype=d)) for n, d, s in PARAM_SPECS])
    w = TrajectoryWriter(tmp_path, _meta(layout))
    given = []
    for t in range(len(BATCH_GEOM)):
        tensors = [_special(d, s, 1000 * t + i) for i, (_, d, s) in enumerate(PARAM_SPECS)]
        batch = _batch(t) if t != 7 else None          # record 7 has no batch
        spec, leaves = flatten_batch(batch) if batch is not None else (None, [])
        w.append(Snapshot(step=3 * t, loss=t / 9, params=pack(layout, tensors), buffers={},
                          hparams=np.array([[0.1 * t, 0.9]]), state_layout=None, state={},
                          batch_spec=spec, batch=leaves), commit=t % 3 == 2)
        if t % 4 == 1:
            w.skip(3 * t + 1, commit=False)
        given.append((tensors, batch))
    w.commit()
    w.close()
    arrays = per_record_arrays(tmp_path / store.STORE_NAME)
    # the geometry this test is about is really there
    assert arrays["params/bool"].chunks == (1, 16) and arrays["params/bool"].shape[1] == 40   # 3 columns
    assert arrays["batch/.0.f16"].chunks == (1, 3, 3) and arrays["batch/.0.f16"].shape[1] == 6
    assert arrays["batch/.0.s"].shape[1:] == () and arrays["skipped"].shape[1:] == ()
    assert _rows_agree_with_zarr(tmp_path) > 200
    r = TrajectoryReader(tmp_path)
    assert list(r.skipped) == [4, 16, 28]
    for t, (tensors, batch) in enumerate(given):
        got = r.params(t)
        for (name, _, _), want in zip(PARAM_SPECS, tensors):
            _equal(got[name], want, f"{name}@{t}")
        if batch is None:
            assert r.batch(t) is None
        else:
            _equal(r.batch(t), batch, f"batch_{t}")
        assert r.hparams(t) == [{"lr": pytest.approx(0.1 * t), "momentum": 0.9}]


def test_packed_row_longer_than_4mi_elements_real_split(tmp_path):
    """Without monkeypatching: a bool pack of 4 Mi + 5 elements (two chunk columns, the second
    padded) and an int8 pack; trajscope's rows == zarr's == what was written."""
    n = (1 << 22) + 5
    layout = make_layout([("mask", torch.zeros(n, dtype=torch.bool)), ("q", torch.zeros(7, dtype=torch.int8)),
                          ("w", torch.zeros(3))])
    w = TrajectoryWriter(tmp_path, _meta(layout))
    given = []
    for t in range(2):
        g = torch.Generator().manual_seed(t)
        tensors = [torch.rand(n, generator=g) > 0.5, torch.randint(-128, 127, (7,), generator=g, dtype=torch.int8),
                   torch.randn(3, generator=g)]
        tensors[0][-5:] = torch.tensor([True, False, True, True, t == 1])   # the padded tail chunk
        w.append(Snapshot(step=t, loss=0.0, params=pack(layout, tensors), buffers={}, hparams=np.array([[0.1, 0.0]]),
                          state_layout=None, state={}, batch_spec=None, batch=[]))
        given.append(tensors)
    w.close()
    arr = per_record_arrays(tmp_path / store.STORE_NAME)["params/bool"]
    assert arr.chunks == (1, 1 << 22) and arr.shape[1] == n
    assert sorted(p.name for p in (tmp_path / store.STORE_NAME / "params" / "bool").glob("c.*")) == ["c.0.0", "c.0.1"]
    r = TrajectoryReader(tmp_path)
    for t in range(2):
        _same(r._read_row("params/bool", t), arr[t], f"bool row {t}")
        got = r.params(t)
        for (name, _), want in zip([("mask", 0), ("q", 0), ("w", 0)], given[t]):
            assert_bitexact(got[name], want, f"{name}@{t}")


def test_restarted_and_resumed_run_matches_zarr(tmp_path, monkeypatch):
    """4-row shards; a restart at step 5 rewrites rows 5.. with other, larger batches (the batch
    arrays grow after rows that stay valid), then a plain resume appends: every committed row read
    directly == zarr, and the checkpoints are the rewritten trajectory."""
    monkeypatch.setattr(store, "_SHARD_ROWS", 4)
    path = tmp_path / "run"
    g = torch.Generator().manual_seed(3)
    base = [(torch.randn(b, 4, generator=g), torch.randn(b, 3, generator=g)) for b in (3, 2, 3, 1, 3, 2, 3, 2, 1)]
    other = [(torch.randn(b, 4, generator=g), torch.randn(b, 3, generator=g)) for b in (7, 5, 9, 2, 8, 6)]
    data = base[:5] + other

    def fresh():
        model = make_model("buffers")
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    model, opt = fresh()
    with Recorder(path, model, opt, LOSS, export=False, background=False) as rec:
        train(model, opt, LOSS, base, rec=rec)
    model, opt = fresh()
    train(model, opt, LOSS, data[:5])
    with Recorder(path, model, opt, LOSS, export=False, background=False, resume=True, step=5) as rec:
        train(model, opt, LOSS, data[5:9], rec=rec)
    with Recorder(path, model, opt, LOSS, export=False, background=False, resume=True) as rec:
        assert rec.step == 9
        train(model, opt, LOSS, data[9:], rec=rec)
    run = trajscope.open_run(path)
    assert list(run.steps) == list(range(11))
    assert [(x["at_step"], x["dropped_records"]) for x in run.restarts] == [(5, 4)]
    assert per_record_arrays(path / store.STORE_NAME)["batch/.0"].chunks == (1, 3, 4)
    assert _rows_agree_with_zarr(path) > 50
    for t in (0, 4, 5, 7, 10):
        assert_batch_equal(run.checkpoint(t).batch, data[t], f"batch_{t}")


def test_reader_opened_while_recording_keeps_its_rows_and_layouts(tmp_path):
    """A reader opened after 3 committed records caches the batch layout, then the recorder grows
    the batch arrays (larger batches) and commits more rows: the reader still reads its 3 rows
    exactly (== zarr), sees no new row, and a fresh reader sees everything."""
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(b, 4, generator=g), torch.randn(b, 3, generator=g)) for b in (3, 2, 3, 9, 12, 1)]
    model = make_model("buffers")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False)
    try:
        train(model, opt, LOSS, data[:3], rec=rec)
        rec.flush()
        early = TrajectoryReader(tmp_path / "run")
        assert early.n_records == 3
        b0 = early.batch(0)                               # layouts of the batch arrays cached here
        assert_batch_equal(b0, data[0], "batch_0")
        train(model, opt, LOSS, data[3:], rec=rec)
        rec.flush()
        for t in range(3):
            assert_batch_equal(early.batch(t), data[t], f"early batch_{t}")
            _same(early._read_row("params/float32", t), per_record_arrays(tmp_path / "run" / store.STORE_NAME)["params/float32"][t],
                  f"params[{t}]")
        assert early.n_records == 3 and list(early.steps) == [0, 1, 2]
    finally:
        rec.close()
    late = TrajectoryReader(tmp_path / "run")
    assert late.n_records == 6
    for t in range(6):
        assert_batch_equal(late.batch(t), data[t], f"late batch_{t}")
    assert _rows_agree_with_zarr(tmp_path / "run") > 30


# --------------------------------------------------------------------------- damaged shards
@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """6 records of the 'tensor' MLP (one shard file per array)."""
    path = tmp_path_factory.mktemp("small") / "run"
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 4, generator=g), torch.randn(4, 3, generator=g)) for _ in range(6)]
    with Recorder(path, model, opt, LOSS, export=False, background=False) as rec:
        train(model, opt, LOSS, data, rec=rec)
    return path


def _entry(path: Path, row: int) -> tuple[int, int]:
    with open(path, "rb") as f:
        f.seek(16 * row)
        return struct.unpack("<QQ", f.read(16))


def _set_entry(path: Path, row: int, off: int, nbytes: int) -> None:
    """Rewrite one index entry and recompute the index CRC: a consistent index with a wrong entry
    (what a buggy writer would leave), so that what is checked here is the entry itself. Without the
    new CRC the index checksum catches any such change first (tests/test_integrity.py)."""
    with open(path, "r+b") as f:
        f.seek(16 * row)
        f.write(struct.pack("<QQ", off, nbytes))
    reseal_index(path, 64)


READ = {"params/float32": lambda r, t: r.params(t), "hparams": lambda r, t: r.hparams(t),
        "state/0/float32": lambda r, t: r.state(t), "batch/.0": lambda r, t: r.batch(t),
        "batch_shape/.1": lambda r, t: r.batch(t)}


def _damage(shard: Path, kind: str, row: int) -> None:
    off, nb = _entry(shard, row)
    size = shard.stat().st_size
    if kind == "entry_past_end":
        _set_entry(shard, row, size + 16, nb)
    elif kind == "entry_straddles_end":
        _set_entry(shard, row, size - nb // 2, nb)
    elif kind == "nbytes_too_large":
        _set_entry(shard, row, off, nb + 8)
    elif kind == "nbytes_too_small":
        _set_entry(shard, row, off, nb - 1)
    elif kind == "nbytes_zero":
        _set_entry(shard, row, off, 0)
    elif kind == "offset_empty_only":
        _set_entry(shard, row, EMPTY, nb)
    elif kind == "cut_inside_index":
        with open(shard, "r+b") as f:
            f.truncate(16 * row + 8)
    elif kind == "empty_file":
        with open(shard, "r+b") as f:
            f.truncate(0)
    elif kind == "directory":
        shard.unlink()
        shard.mkdir()
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["entry_past_end", "entry_straddles_end", "nbytes_too_large", "nbytes_too_small",
                                  "nbytes_zero", "offset_empty_only", "cut_inside_index", "empty_file", "directory"])
@pytest.mark.parametrize("array", sorted(READ))
def test_damaged_index_or_file_is_one_line_error(small_store, tmp_path, array, kind):
    """Row 3's chunk is damaged in one of many ways: reading it is a one-line TrajscopeError that
    names the array (never zeros, never another exception); row 2 still reads unless the damage
    reaches it (cut file)."""
    path = tmp_path / "run"
    shutil.copytree(small_store, path)
    shard = next((path / store.STORE_NAME / array).glob("c.0*"))
    _damage(shard, kind, 3)
    r = TrajectoryReader(path)
    with pytest.raises(TrajscopeError) as e:
        READ[array](r, 3)
    msg = str(e.value)
    assert "\n" not in msg and array in msg, msg
    if kind not in ("empty_file", "directory", "cut_inside_index"):
        READ[array](r, 2)


# Regression test (found in review, fixed): an index offset >= 2**63 (garbage in a damaged index)
# makes os.pread raise OverflowError, which _read_row does not catch (store.py _read_row: except
# (OSError, struct.error)); before 8850fcb it was the 'chunk is missing' TrajscopeError
@pytest.mark.parametrize("off", [2**63, EMPTY - 1])
def test_index_offset_beyond_off_t_is_one_line_error(small_store, tmp_path, off):
    path = tmp_path / "run"
    shutil.copytree(small_store, path)
    shard = path / store.STORE_NAME / "params" / "float32" / "c.0.0"
    _, nb = _entry(shard, 3)
    _set_entry(shard, 3, off, nb)           # nbytes right, offset garbage
    r = TrajectoryReader(path)
    with pytest.raises(TrajscopeError, match="params/float32"):
        r.params(3)


def test_index_pointing_at_another_row_reads_like_zarr(small_store, tmp_path):
    """An entry that points at another row's chunk (right size, inside the file) is what zarr
    decodes too: the direct read follows the index exactly as zarr does."""
    path = tmp_path / "run"
    shutil.copytree(small_store, path)
    shard = path / store.STORE_NAME / "params" / "float32" / "c.0.0"
    off4, nb = _entry(shard, 4)
    _set_entry(shard, 3, off4, nb)
    r = TrajectoryReader(path)
    arr = per_record_arrays(path / store.STORE_NAME)["params/float32"]
    _same(r._read_row("params/float32", 3), arr[3], "row 3")
    _same(r._read_row("params/float32", 3), arr[4], "row 3 is row 4's chunk")


def test_open_and_read_row_agree_on_damage(small_store, tmp_path):
    """The records read at open (straight from the shard files) and _read_row share the layout:
    both accept every intact row and both reject a blanked entry."""
    path = tmp_path / "run"
    shutil.copytree(small_store, path)
    r = TrajectoryReader(path)
    arr = per_record_arrays(path / store.STORE_NAME)
    assert r._records.tobytes() == np.asarray(arr["records"][:6]).tobytes()
    for t in range(6):
        r._read_row("params/float32", t)
        r._read_row("batch/.0", t, [4, 4])
    _set_entry(path / store.STORE_NAME / "params" / "float32" / "c.0.0", 5, EMPTY, EMPTY)
    r2 = TrajectoryReader(path)
    with pytest.raises(TrajscopeError, match="step 5 of params/float32 is damaged .its chunk is missing"):
        r2._read_row("params/float32", 5)
    r2._read_row("params/float32", 4)
    _set_entry(path / store.STORE_NAME / "records" / "c.0.0", 5, EMPTY, EMPTY)
    with pytest.raises(TrajscopeError, match="row 5 of records is damaged .its chunk is missing"):
        TrajectoryReader(path)


def test_missing_or_broken_array_document_is_one_line_error(small_store, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(small_store, path)
    (path / store.STORE_NAME / "hparams" / "zarr.json").write_text("{not json")
    shutil.rmtree(path / store.STORE_NAME / "params" / "float32")
    r = TrajectoryReader(path)
    with pytest.raises(TrajscopeError, match="step 0 of params/float32 is damaged .its zarr.json is missing"):
        r.params(0)
    with pytest.raises(TrajscopeError, match="step 0 of hparams is damaged .its zarr.json is unreadable"):
        r.hparams(0)


# --------------------------------------------------------------------------- a group added mid-run
# The store describes the parameter groups once; a group added mid-run (fine-tuning: unfreezing a
# head) used to widen the hparams array so that the rows before it could not be read back. The
# recorder now stops at that step with one warning, and every record before it stays readable.
def test_a_param_group_added_mid_run_stops_recording_cleanly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    with pytest.warns(RuntimeWarning, match="parameter groups changed"):
        with Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False) as rec:
            for t in range(4):
                if t == 2:       # fine-tuning: unfreeze the head with its own learning rate
                    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
                x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
                loss = LOSS(model(x), y)
                opt.zero_grad()
                loss.backward()
                rec.batch(x, y)
                opt.step()   # training goes on
    assert rec.failed is not None and "parameter groups changed" in str(rec.failed)
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1]
    assert [h["lr"] for h in run.reader.hparams(0)] == [0.1] == [h["lr"] for h in run.reader.hparams(1)]
