"""The trajectory.zarr format: bit-exact round trips, the commit marker, and damaged stores.

Long (over 400 lines) because it holds every case of trajscope.io's reader and writer
outside the shard layout: the review cases of the reader (below the first fold marker) and the
probe leaves of odd dtypes and layouts (below the second), each section on its own.
"""

from __future__ import annotations

import json

# imports of the cases folded from test_review_device_timer_probe (below)
import math
import shutil

# imports of the cases folded from test_store_reader_review (below)
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import trajscope
from tests.helpers.recording import (
    Ref,
    assert_batch_equal,
    assert_bitexact,
    assert_state_bitexact,
    assert_tensors_bitexact,
    drop_chunks,
    make_batches,
    make_model,
    per_record_arrays,
    reseal_index,
    train,
)
from tests.helpers.recording import raw_bytes as _raw
from trajscope import TrajscopeError
from trajscope.errors import DamagedRecordError
from trajscope.io import files, packing
from trajscope.io import layout as store
from trajscope.io.packing import (
    flatten_batch,
    make_layout,
    numeric_hparams,
    pack,
    restore_hparams,
    unflatten_batch,
    unpack,
)
from trajscope.io.reader import TrajectoryReader
from trajscope.io.records import Snapshot
from trajscope.io.writer import TrajectoryWriter
from trajscope.record.recorder import Recorder

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def special_values(dtype: torch.dtype, n: int = 37) -> torch.Tensor:
    """Random values plus the ones a lossy path would break: -0.0, ±inf, NaN, subnormals, extremes."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    fi = torch.finfo(dtype)
    t[:7] = torch.tensor(
        [-0.0, float("inf"), float("-inf"), float("nan"), fi.tiny / 4, fi.max, -fi.min], dtype=torch.float64
    ).to(dtype)
    return t


# --------------------------------------------------------------------------- pure format helpers
@pytest.mark.parametrize("dtype", DTYPES + [torch.int64, torch.bool, torch.uint8])
def test_pack_unpack_roundtrip(dtype):
    if dtype.is_floating_point:
        a = special_values(dtype).reshape(37, 1)
        b = special_values(dtype, 24).reshape(4, 6).t()  # non-contiguous
    else:
        a = torch.arange(37).reshape(37, 1).to(dtype)
        b = (torch.arange(24) % 3).reshape(4, 6).t().to(dtype)
    c = torch.ones((), dtype=torch.float32)  # another pack, 0-d
    items = [("a", a), ("c", c), ("b", b)]
    layout = make_layout(items)
    packed = pack(layout, [t for _, t in items])
    rows = {k: packing._to_numpy(v) for k, v in packed.items()}
    out = unpack(layout, rows)
    for name, t in items:
        assert_bitexact(out[name], t, name)
    a_before = a.clone()
    for flat in packed.values():
        flat.zero_()  # the snapshot is a private copy: the optimizer's update cannot reach it
    assert_bitexact(a, a_before, "pack copies")


def test_batch_structure_roundtrip():
    x = {
        "ids": torch.arange(6).reshape(3, 2),
        "mask": torch.tensor([True, False, True]),
        "nested": [torch.ones(3), (torch.zeros(3, 1, dtype=torch.float16), None)],
    }
    y = (torch.randn(3), 2, 0.5, True)
    spec, leaves = flatten_batch((x, y))
    back = unflatten_batch(json.loads(json.dumps(spec)), dict(leaves))
    assert_batch_equal(back, (x, y))
    with pytest.raises(TypeError):
        flatten_batch((object(), None))


def test_hparams_roundtrip():
    g = {
        "params": [],
        "lr": torch.tensor(0.01),
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "amsgrad": False,
        "foreach": None,
        "nesterov": True,
        "differentiable": False,
    }
    hp = numeric_hparams(g)
    names = list(hp)
    back = restore_hparams(names, np.array([hp[k] for k in names]), ["amsgrad", "nesterov", "differentiable"])
    assert back == {
        "lr": pytest.approx(0.01),
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "amsgrad": False,
        "nesterov": True,
        "differentiable": False,
    }
    assert isinstance(back["nesterov"], bool)


# --------------------------------------------------------------------------- writer / reader
def _meta(layout, hparam_names=("lr",)):
    return {
        "params": [s.to_json() for s in layout],
        "buffers": [],
        "hparam_names": list(hparam_names),
        "hparam_bools": [],
        "cadence": {"every": 1, "window": 1},
        "optimizer": {"class": "torch.optim.sgd.SGD", "name": "SGD", "groups": [{"params": [s.name for s in layout]}]},
        "model": {"spec": None, "kwargs": {}, "exported": None, "export_error": "none", "node_layers": []},
        "loss": None,
    }


def _snap(step, layout, tensors, batch=None):
    spec, leaves = flatten_batch(batch) if batch is not None else (None, [])
    return Snapshot(
        step=step,
        loss=float(step) / 3,
        params=pack(layout, tensors),
        buffers={},
        hparams=np.array([[0.1 * (step + 1)]]),
        state_layout=None,
        state={},
        batch_spec=spec,
        batch=leaves,
    )


def test_writer_reader_special_values_all_dtypes_and_long_rows(tmp_path, monkeypatch):
    """Every dtype bit-exact (NaN, -0.0, inf, subnormals); rows longer than a chunk split and come
    back; rows span several shard files."""
    monkeypatch.setattr(store, "_MAX_CHUNK_ELEMS", 16)  # force several chunks per packed row
    monkeypatch.setattr(store, "_SHARD_ROWS", 2)  # and several shards per array
    items = [(f"p_{str(d).removeprefix('torch.')}", special_values(d)) for d in DTYPES]
    layout = make_layout(items)
    w = TrajectoryWriter(tmp_path, _meta(layout))
    rows = []
    for step in range(3):
        tensors = [t * (step + 1) if step else t for _, t in items]
        rows.append(tensors)
        w.append(_snap(step, layout, tensors, batch=(tensors[0][:5], None)))
    r = TrajectoryReader(tmp_path)
    assert list(r.steps) == [0, 1, 2] and list(r.losses) == [0, 1 / 3, 2 / 3]
    for step in range(3):
        got = r.params(step)
        for (name, _), want in zip(items, rows[step]):
            assert_bitexact(got[name], want, f"{name}@{step}")
        assert r.hparams(step) == [{"lr": pytest.approx(0.1 * (step + 1))}]
        assert_batch_equal(r.batch(step), (rows[step][0][:5], None))
    # bf16 is stored as its bit pattern
    assert r.root["params/bfloat16"].dtype == np.dtype("uint16")
    # zarr itself reads the same rows from the shard files
    whole = r.root["params/float32"][:3]
    for step in range(3):
        assert whole[step].tobytes() == r._read_row("params/float32", step).tobytes()
    # the chunks of a long row go missing: reading raises, it never returns zeros
    assert len(drop_chunks(tmp_path, "params/float32", 1)) > 2
    with pytest.raises(
        DamagedRecordError, match="step 1 of params/float32 is damaged .its chunk is missing, the store was truncated"
    ):
        TrajectoryReader(tmp_path).params(1)
    TrajectoryReader(tmp_path).params(2)
    # a shard file cut short (a copy that stopped half-way): its later rows are missing
    arr = r.root["params/float32"]
    shard = tmp_path / "trajectory.zarr" / "params/float32" / arr.metadata.encode_chunk_key((1, 0))
    with open(shard, "r+b") as f:
        f.truncate(f.seek(0, 2) - 1)
    with pytest.raises(
        DamagedRecordError,
        match="step 2 of params/float32 is damaged .its shard file is cut short, the store was truncated",
    ):
        TrajectoryReader(tmp_path).params(2)
    TrajectoryReader(tmp_path).params(0)


def test_uncommitted_rows_are_invisible(tmp_path):
    """Chunks of a row whose commit never happened (a kill mid-record) are not visible."""
    items = [("w", torch.randn(3, 2))]
    layout = make_layout(items)
    w = TrajectoryWriter(tmp_path, _meta(layout))
    w.append(_snap(0, layout, [items[0][1]]))
    w.append(_snap(1, layout, [items[0][1] + 1]))
    w._write_commit(records=1, last_step=0)  # as if the process died right before the commit
    r = TrajectoryReader(tmp_path)
    assert list(r.steps) == [0] and r.n_records == 1
    assert_bitexact(r.params(0)["w"], items[0][1])
    with pytest.raises(TrajscopeError, match="not recorded"):
        trajscope.open_run(tmp_path).checkpoint(1)


def test_store_creation_is_atomic(tmp_path, monkeypatch):
    """A process killed while creating the store leaves either no run or a run that opens."""
    items = [("w", torch.randn(2))]
    layout = make_layout(items)

    def die(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(files.os, "rename", die)
    with pytest.raises(KeyboardInterrupt):
        TrajectoryWriter(tmp_path / "run", _meta(layout))
    assert not store.is_run(tmp_path / "run")
    monkeypatch.undo()
    TrajectoryWriter(tmp_path / "run", _meta(layout))  # also clears the stray temporary store
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["trajectory.zarr"]
    assert len(trajscope.open_run(tmp_path / "run")) == 0


# --------------------------------------------------------------------------- through the Recorder
@pytest.mark.parametrize("dtype", DTYPES)
def test_recorder_roundtrip_dtypes(tmp_path, dtype):
    """Parameters, buffers (float/int64/bool), Adam state and batches (short last batch) of every dtype."""

    def run_loop(rec_path):
        model = make_model("buffers", dtype=dtype)
        opt = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3, weight_decay=1e-3)  # eps survives fp16
        loss_fn = torch.nn.MSELoss()
        batches = make_batches("tensor", 4, dtype=dtype)
        if rec_path is None:
            return train(model, opt, loss_fn, batches, ref=Ref()), batches
        with Recorder(rec_path, model, opt, loss_fn, export=False) as rec:
            train(model, opt, loss_fn, batches, rec=rec)
        return rec, batches

    ref, batches = run_loop(None)
    rec, _ = run_loop(tmp_path / "run")
    assert rec.failed is None
    run = trajscope.open_run(tmp_path / "run")
    want_pack = "bfloat16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")
    assert set(run.param_dtypes.values()) == {want_pack}
    for t in range(4):
        ck = run.checkpoint(t)
        assert_tensors_bitexact(ck.params, ref.params[t], f"theta_{t}")
        assert_tensors_bitexact(ck.buffers, ref.buffers[t], f"buffers_{t}")
        assert_state_bitexact(ck.optimizer_state, ref.state[t], f"state_{t}")
        assert_batch_equal(ck.batch, batches[t], f"batch_{t}")
        assert ck.loss == ref.losses[t] and np.isfinite(ck.loss)
    assert ck.inputs.shape[0] == 3 and ck.buffers["count"].item() == 4


def test_recorder_roundtrip_nested_batch_and_probe(tmp_path):
    """A dict/tuple batch with int64, bool, constants and None leaves; a probe batch stored once."""
    model = make_model("dict")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()
    probe = ({"features": torch.randn(7, 4), "scale": torch.ones(7, 1)}, torch.randn(7, 3))
    given = []
    with Recorder(tmp_path / "run", model, opt, loss_fn, export=False, probe=probe) as rec:
        for t, (x, y) in enumerate(make_batches("dict", 3)):
            loss = loss_fn(model(**x), y)
            opt.zero_grad()
            loss.backward()
            inputs = {
                **x,
                "ids": torch.arange(len(y)) * (t + 1),
                "keep": torch.arange(len(y)) % 2 == 0,
                "temperature": torch.tensor(0.5 + t),
            }  # a 0-d leaf
            targets = (y, [y.to(torch.float64), None], 7)
            rec.batch(inputs, targets)
            given.append((inputs, targets))
            opt.step()
    run = trajscope.open_run(tmp_path / "run")
    for t in range(3):
        assert_batch_equal(run.checkpoint(t).batch, given[t], f"batch_{t}")
    assert_batch_equal(run.probe, probe, "probe")


def test_probe_leaves_of_every_kind_roundtrip_and_read_by_plain_zarr(tmp_path):
    """The probe is written without zarr (no event-loop thread in the training process): every
    dtype, a 0-d and an empty leaf, a non-contiguous one come back bit-exact, through trajscope
    and through plain zarr; a resumed run's new probe replaces the old one."""
    import zarr

    leaves = {f"f_{str(d).split('.')[-1]}": special_values(d).reshape(37, 1) for d in DTYPES}
    leaves.update(
        ints=torch.arange(-5, 7, dtype=torch.int64),
        flags=torch.arange(9) % 3 == 0,
        bytes_=torch.arange(250, 256, dtype=torch.uint8),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 4),
        strided=torch.randn(4, 6).t(),
    )
    probe = (leaves, torch.randn(3, 2, dtype=torch.float64))
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_batches("tensor", 2)
    with Recorder(tmp_path / "run", model, opt, torch.nn.MSELoss(), export=False, probe=probe) as rec:
        train(model, opt, torch.nn.MSELoss(), data, rec=rec)
    assert_batch_equal(trajscope.open_run(tmp_path / "run").probe, probe, "probe")
    spec, flat = flatten_batch(probe, "probe")
    for key, t in flat:
        arr = zarr.open_array(str(tmp_path / "run" / store.STORE_NAME / "probe" / key), mode="r")
        want = t.contiguous()
        want = want.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else want.numpy()
        assert arr.shape == want.shape and arr.dtype == want.dtype, key
        assert np.asarray(arr[...]).tobytes() == want.tobytes(), key

    new_probe = ({"other": torch.arange(4.0)}, torch.ones(4, 1))
    with Recorder(tmp_path / "run", model, opt, torch.nn.MSELoss(), export=False, probe=new_probe, resume=True):
        pass
    assert_batch_equal(trajscope.open_run(tmp_path / "run").probe, new_probe, "resumed probe")


def test_batches_growing_and_shrinking(tmp_path):
    """Batch sizes 3, 5, 2, 5: the first fixes the chunk shape, a larger one grows the array (two chunks per row)."""
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()
    g = torch.Generator().manual_seed(5)
    given = [(torch.randn(b, 4, generator=g), torch.randn(b, 3, generator=g)) for b in (3, 5, 2, 5)]
    with Recorder(tmp_path / "run", model, opt, loss_fn, export=False) as rec:
        train(model, opt, loss_fn, given, rec=rec)
    run = trajscope.open_run(tmp_path / "run")
    for t in range(4):
        assert_batch_equal(run.checkpoint(t).batch, given[t], f"batch_{t}")
    # the chunk files are exactly what zarr itself reads back for the whole array
    arr = run.reader.root["batch/.0"]
    assert arr.chunks == (1, 3, 4) and arr[1, :5].tobytes() == given[1][0].numpy().tobytes()


def test_batch_leaves_of_every_dtype_read_back_by_trajscope_and_plain_zarr(tmp_path):
    """Integer, bool and complex leaves (the array documents are written by trajscope itself):
    bit-exact through the reader, and plain zarr decodes the same rows."""
    import zarr

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, generator=g)
    extra = {
        "u8": torch.randint(0, 255, (3, 5), generator=g, dtype=torch.uint8),
        "b": torch.rand(3, 2, generator=g) > 0.5,
        "i8": torch.randint(-100, 100, (3,), generator=g, dtype=torch.int8),
        "i16": torch.randint(-999, 999, (3, 2), generator=g, dtype=torch.int16),
        "i32": torch.randint(-99999, 99999, (3,), generator=g, dtype=torch.int32),
        "c64": torch.randn(3, 2, dtype=torch.complex64, generator=g),
    }
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()
    y = torch.randn(3, 3, generator=g)
    with Recorder(tmp_path / "run", model, opt, loss_fn, export=False) as rec:
        for _ in range(2):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, {"y": y, **extra})
            opt.step()
    run = trajscope.open_run(tmp_path / "run")
    for t in range(2):
        assert_batch_equal(run.checkpoint(t).batch, (x, {"y": y, **extra}), f"batch_{t}")
    root = zarr.open_group(str(tmp_path / "run" / "trajectory.zarr"), mode="r", use_consolidated=False)
    for key, want in extra.items():
        got = root[f"batch/.1.{key}"][1]
        assert got.dtype == want.numpy().dtype and got.tobytes() == want.numpy().tobytes(), key
        assert list(root[f"batch_shape/.1.{key}"][1]) == list(want.shape), key


class _SeqModel(torch.nn.Module):
    """(B, T, 4) sequences with a (T,) mask -> (B, 3): T may change from step to step."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, mask):
        return (self.lin(x) * mask[None, :, None]).mean(1)


def test_batch_leaves_whose_other_dims_vary(tmp_path):
    """Sequence length varying per step, and a leaf whose dim 0 is not the batch: every record's
    leaves read back with their own shapes, bit-exact (not padded to the largest ones)."""
    torch.manual_seed(0)
    model = _SeqModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()
    g = torch.Generator().manual_seed(1)
    given = [
        (
            {"x": torch.randn(b, T, 4, generator=g), "mask": (torch.rand(T, generator=g) > 0.3).float()},
            torch.randn(b, 3, generator=g),
        )
        for b, T in [(3, 5), (2, 7), (4, 2), (3, 7)]
    ]
    with Recorder(tmp_path / "run", model, opt, loss_fn, export=False) as rec:
        for x, y in given:
            loss = loss_fn(model(**x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()
    assert rec.failed is None
    run = trajscope.open_run(tmp_path / "run")
    for t, want in enumerate(given):
        assert_batch_equal(run.checkpoint(t).batch, want, f"batch_{t}")


def test_batch_structure_change_stops_recording(tmp_path):
    """A batch whose leaves change mid-run cannot share the run's batch arrays: one warning,
    recording stops, training goes on, earlier records stay readable."""
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()
    batches = make_batches("tensor", 4)
    with pytest.warns(RuntimeWarning, match="batch structure changed"):
        with Recorder(tmp_path / "run", model, opt, loss_fn, export=False) as rec:
            for t, (x, y) in enumerate(batches):
                loss = loss_fn(model(x), y)
                opt.zero_grad()
                loss.backward()
                rec.batch({"x": x} if t == 2 else x, y)
                opt.step()
    assert rec.failed and "batch structure" in rec.failed
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1]
    assert_batch_equal(run.checkpoint(1).batch, batches[1])


def test_record_without_batch_call_has_no_batch(tmp_path):
    """A step whose loop did not call rec.batch() is recorded without a batch (None), not as damage."""
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()
    batches = make_batches("tensor", 3)
    with Recorder(tmp_path / "run", model, opt, loss_fn, export=False) as rec:
        for t, (x, y) in enumerate(batches):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            if t != 1:
                rec.batch(x, y)
            opt.step()
    run = trajscope.open_run(tmp_path / "run")
    assert run.checkpoint(1).batch is None and run.checkpoint(1).loss == pytest.approx(run.losses[1])
    assert_batch_equal(run.checkpoint(2).batch, batches[2])


# --------------------------------------------------------------------------- damaged stores
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "run"
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.MSELoss()
    with Recorder(
        path, model, opt, loss_fn, export=False, model_spec="trajscope.zoo:mlp", model_kwargs={"sizes": [4, 6, 3]}
    ) as rec:
        train(model, opt, loss_fn, make_batches("tensor", 5), rec=rec)
    return path


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("array", ["params/float32", "state/0/float32", "hparams", "batch/.0"])
def test_missing_chunk_raises_one_line(small_run, tmp_path, array):
    path = _copy(small_run, tmp_path)
    assert len(drop_chunks(path, array, 2)) == 1
    run = trajscope.open_run(path)
    with pytest.raises(TrajscopeError) as ei:
        run.checkpoint(2)
    msg = str(ei.value)
    assert "\n" not in msg and "truncated" in msg and array in msg
    run.checkpoint(1)
    run.checkpoint(3)


def test_missing_records_chunk_fails_at_open(small_run, tmp_path):
    path = _copy(small_run, tmp_path)
    drop_chunks(path, "records", 3)
    with pytest.raises(TrajscopeError, match="truncated"):
        trajscope.open_run(path)


def test_other_format_version_and_not_a_run(small_run, tmp_path):
    path = _copy(small_run, tmp_path)
    meta_file = path / "trajectory.zarr" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(TrajscopeError, match="format version 99"):
        trajscope.open_run(path)
    with pytest.raises(TrajscopeError, match="format version 99"):  # nor is it resumed
        m = make_model("tensor")
        Recorder(path, m, torch.optim.SGD(m.parameters(), lr=0.1), resume=True)
    with pytest.raises(TrajscopeError, match="not a trajscope run"):
        trajscope.open_run(tmp_path)
    with pytest.raises(TrajscopeError, match="does not exist"):
        trajscope.open_run(tmp_path / "nope")


@pytest.mark.parametrize(
    "spec,kwargs,name",
    [
        ("trajscope.zoo:mlp", '{"sizes": [4, 7, 3]}', "0.weight"),  # wrong shape
        ("trajscope.zoo:mlp", '{"sizes": [4, 6, 3], "bias": false}', "0.bias"),  # missing parameter
        ("trajscope.zoo:mlp", '{"sizes": [4, 6, 3, 3]}', "4."),  # extra parameter
    ],
)
def test_model_spec_mismatch_names_the_parameter(small_run, spec, kwargs, name):
    run = trajscope.open_run(small_run)
    with pytest.raises(TrajscopeError) as ei:
        run.model(spec, kwargs)
    assert name in str(ei.value) and "\n" not in str(ei.value)
    run.model()  # the recorded spec matches


# ==============================================================================================
# folded from test_store_reader_review:
# Review of TrajectoryReader's direct shard reads (``_read_row``, ``_row_layout``, ``_row_extents``,
# ``_check_chunks``): every committed row must be exactly what plain ``zarr`` decodes from the same
# store (dtype, shape, bytes), for every dtype and geometry the writer produces, and damage must be a
# one-line TrajscopeError naming the array.
#
# Tests marked "Regression test" failed before the fixes this review led to.
# ==============================================================================================

LOSS = torch.nn.MSELoss()
EMPTY = 2**64 - 1


# --------------------------------------------------------------------------- helpers
def _review_meta(layout):
    return {
        "params": [s.to_json() for s in layout],
        "buffers": [],
        "hparam_names": ["lr", "momentum"],
        "hparam_bools": [],
        "cadence": {"every": 1, "window": 1},
        "optimizer": {"class": "torch.optim.sgd.SGD", "name": "SGD", "groups": [{"params": [s.name for s in layout]}]},
        "model": {"spec": None, "kwargs": {}, "exported": None, "export_error": "none", "node_layers": []},
        "loss": None,
    }


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
        whole = arr[:n]  # one zarr read per array
        for row in range(n):
            if name.startswith("state/") and int(r._records[row, 3]) != int(name.split("/")[1]):
                continue  # the row used another optimizer-state layout
            if name.startswith("batch") and r._records[row, 2] < 0:
                continue  # the record has no batch
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
            t[:3] = torch.tensor(
                [complex(float("nan"), -0.0), complex(float("inf"), 1.0), complex(-0.0, -float("inf"))], dtype=dtype
            )
    elif dtype.is_floating_point:
        t = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        fi = torch.finfo(dtype)
        sp = torch.tensor([-0.0, float("nan"), float("inf"), fi.tiny / 4, fi.max, fi.min], dtype=torch.float64).to(
            dtype
        )
        t[: min(n, 6)] = sp[: min(n, 6)]
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), (n,), generator=g, dtype=torch.int64).to(
            dtype
        )
        if n >= 2:
            t[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return t.reshape(shape)


PARAM_SPECS = [
    ("b", torch.bool, (40,)),
    ("i8", torch.int8, (5, 7)),
    ("u8", torch.uint8, (3,)),
    ("i16", torch.int16, (2, 2)),
    ("i32", torch.int32, (17,)),
    ("i64", torch.int64, ()),
    ("f16", torch.float16, (33,)),
    ("bf16", torch.bfloat16, (20,)),
    ("f32", torch.float32, (2, 3)),
    ("f64", torch.float64, (0,)),
    ("c64", torch.complex64, (9,)),
    ("c128", torch.complex128, (4,)),
    ("f32b", torch.float32, ()),
    ("bf16b", torch.bfloat16, (3, 3)),
]
# batch size and sequence length per record: the first fixes the chunk shape, later ones grow past it
# (several chunk columns per row), shrink, and a 0-size batch
BATCH_GEOM = [(3, 2), (5, 4), (2, 1), (6, 5), (0, 3), (1, 2), (4, 4), (6, 1), (3, 5), (2, 2), (5, 3)]


def _batch(t: int):
    b, T = BATCH_GEOM[t]
    x = {
        "f16": _special(torch.float16, (b, 3), 100 + t),
        "bf": _special(torch.bfloat16, (b,), 200 + t),
        "mask": _special(torch.bool, (b, T), 300 + t),
        "i8": _special(torch.int8, (b,), 400 + t),
        "c": _special(torch.complex64, (b, 2), 500 + t),
        "s": torch.tensor(t, dtype=torch.int64),
        "h": _special(torch.float16, (), 600 + t),
    }
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
    w = TrajectoryWriter(tmp_path, _review_meta(layout))
    given = []
    for t in range(len(BATCH_GEOM)):
        tensors = [_special(d, s, 1000 * t + i) for i, (_, d, s) in enumerate(PARAM_SPECS)]
        batch = _batch(t) if t != 7 else None  # record 7 has no batch
        spec, leaves = flatten_batch(batch) if batch is not None else (None, [])
        w.append(
            Snapshot(
                step=3 * t,
                loss=t / 9,
                params=pack(layout, tensors),
                buffers={},
                hparams=np.array([[0.1 * t, 0.9]]),
                state_layout=None,
                state={},
                batch_spec=spec,
                batch=leaves,
            ),
            commit=t % 3 == 2,
        )
        if t % 4 == 1:
            w.skip(3 * t + 1, commit=False)
        given.append((tensors, batch))
    w.commit()
    w.close()
    arrays = per_record_arrays(tmp_path / store.STORE_NAME)
    # the geometry this test is about is really there
    assert arrays["params/bool"].chunks == (1, 16) and arrays["params/bool"].shape[1] == 40  # 3 columns
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
    layout = make_layout(
        [("mask", torch.zeros(n, dtype=torch.bool)), ("q", torch.zeros(7, dtype=torch.int8)), ("w", torch.zeros(3))]
    )
    w = TrajectoryWriter(tmp_path, _review_meta(layout))
    given = []
    for t in range(2):
        g = torch.Generator().manual_seed(t)
        tensors = [
            torch.rand(n, generator=g) > 0.5,
            torch.randint(-128, 127, (7,), generator=g, dtype=torch.int8),
            torch.randn(3, generator=g),
        ]
        tensors[0][-5:] = torch.tensor([True, False, True, True, t == 1])  # the padded tail chunk
        w.append(
            Snapshot(
                step=t,
                loss=0.0,
                params=pack(layout, tensors),
                buffers={},
                hparams=np.array([[0.1, 0.0]]),
                state_layout=None,
                state={},
                batch_spec=None,
                batch=[],
            )
        )
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
        b0 = early.batch(0)  # layouts of the batch arrays cached here
        assert_batch_equal(b0, data[0], "batch_0")
        train(model, opt, LOSS, data[3:], rec=rec)
        rec.flush()
        for t in range(3):
            assert_batch_equal(early.batch(t), data[t], f"early batch_{t}")
            _same(
                early._read_row("params/float32", t),
                per_record_arrays(tmp_path / "run" / store.STORE_NAME)["params/float32"][t],
                f"params[{t}]",
            )
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
    new CRC the index checksum catches any such change first (tests/io/test_integrity.py)."""
    with open(path, "r+b") as f:
        f.seek(16 * row)
        f.write(struct.pack("<QQ", off, nbytes))
    reseal_index(path, 64)


READ = {
    "params/float32": lambda r, t: r.params(t),
    "hparams": lambda r, t: r.hparams(t),
    "state/0/float32": lambda r, t: r.state(t),
    "batch/.0": lambda r, t: r.batch(t),
    "batch_shape/.1": lambda r, t: r.batch(t),
}


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


@pytest.mark.parametrize(
    "kind",
    [
        "entry_past_end",
        "entry_straddles_end",
        "nbytes_too_large",
        "nbytes_too_small",
        "nbytes_zero",
        "offset_empty_only",
        "cut_inside_index",
        "empty_file",
        "directory",
    ],
)
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
# makes os.pread raise OverflowError, which _read_row does not catch (io/reader.py _read_row: except
# (OSError, struct.error)); before 8850fcb it was the 'chunk is missing' TrajscopeError
@pytest.mark.parametrize("off", [2**63, EMPTY - 1])
def test_index_offset_beyond_off_t_is_one_line_error(small_store, tmp_path, off):
    path = tmp_path / "run"
    shutil.copytree(small_store, path)
    shard = path / store.STORE_NAME / "params" / "float32" / "c.0.0"
    _, nb = _entry(shard, 3)
    _set_entry(shard, 3, off, nb)  # nbytes right, offset garbage
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
                if t == 2:  # fine-tuning: unfreeze the head with its own learning rate
                    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
                x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
                loss = LOSS(model(x), y)
                opt.zero_grad()
                loss.backward()
                rec.batch(x, y)
                opt.step()  # training goes on
    assert rec.failed is not None and "parameter groups changed" in str(rec.failed)
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1]
    assert [h["lr"] for h in run.reader.hparams(0)] == [0.1] == [h["lr"] for h in run.reader.hparams(1)]


# ==============================================================================================
# folded from test_review_device_timer_probe (adversarial review of device handling, the
# commit timer and the plain-Zarr probe writer): the part about this module
# ==============================================================================================
LOSS = nn.MSELoss()


# --------------------------------------------------------------------------------------------
# store: probe leaves of every odd kind
# --------------------------------------------------------------------------------------------
def _odd_leaves() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    c = torch.randn(3, 2, generator=g, dtype=torch.complex64)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 3.4e38, -1.5])
    base = torch.randn(4, 6, generator=g)
    leaves = {
        "bf16": torch.cat([special, torch.randn(4, generator=g)]).to(torch.bfloat16).reshape(3, 4),
        "f16": special.half(),
        "f64_special": special.double(),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "c64": c,
        "c128": torch.randn(2, 2, generator=g, dtype=torch.complex128),
        "conj_view": c.conj(),
        "neg_view": torch._neg_view(torch.randn(3, generator=g)),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "i16_0d": torch.tensor(-7, dtype=torch.int16),
        "bool_0d": torch.tensor(True),
        "f32_0d": torch.tensor(-0.0),
        "i32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "i64": torch.tensor([-(2**63), 2**63 - 1]),
        "empty": torch.zeros(0),
        "empty_3d": torch.zeros(3, 0, 2, dtype=torch.float64),
        "empty_bool": torch.zeros(0, 2, dtype=torch.bool),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.randn(1, 3, generator=g).expand(4, 3),
        "offset_view": base.reshape(-1)[5:11],
        "requires_grad": torch.randn(2, 2, generator=g, requires_grad=True),
        "from_big_endian_numpy": torch.from_numpy(np.arange(6, dtype=">f8").astype("<f8")).reshape(2, 3),
        "channels_last": torch.randn(2, 3, 2, 2, generator=g).to(memory_format=torch.channels_last),
    }
    for name in ("uint16", "uint32", "uint64"):
        dt = getattr(torch, name, None)
        if dt is not None:
            leaves[name] = torch.tensor([0, 1, 7], dtype=torch.int64).to(dt)
    return leaves


@pytest.mark.parametrize("background", [False, True])
def test_odd_probe_leaves_bit_exact_through_trajscope_zarr_and_chunk_bytes(tmp_path, background):
    leaves = _odd_leaves()
    want = {k: v.detach().clone() for k, v in leaves.items()}
    probe = (leaves, [leaves["c64"], None, 3])
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, probe=probe, background=background) as rec:
        train(model, opt, LOSS, make_batches("tensor", 2), rec=rec)
    assert rec.failed is None, rec.failed
    got = trajscope.open_run(tmp_path / "run").probe
    assert isinstance(got, tuple) and isinstance(got[1], list) and got[1][1] is None and got[1][2] == 3
    assert torch.equal(got[1][0], want["c64"])
    spath = tmp_path / "run" / store.STORE_NAME
    walked = {
        name
        for name, node in zarr.open_group(str(spath / "probe"), mode="r").members(max_depth=None)
        if isinstance(node, zarr.Array)
    }
    assert walked == {f"probe.0.{k}" for k in want} | {"probe.1.0"}, sorted(walked)
    for k, w in want.items():
        t = got[0][k]
        assert t.dtype == w.dtype and tuple(t.shape) == tuple(w.shape), (k, t.dtype, t.shape)
        assert _raw(t) == _raw(w), k
        # plain zarr, and the chunk file itself (one uncompressed chunk, C order, little endian)
        arr = zarr.open_array(str(spath / "probe" / f"probe.0.{k}"), mode="r")
        np_want = np.frombuffer(
            _raw(w),
            dtype=np.uint16
            if w.dtype == torch.bfloat16
            else (w.detach().resolve_conj().resolve_neg().contiguous().numpy().dtype),
        ).reshape(tuple(w.shape))
        assert arr.shape == np_want.shape and arr.dtype == np_want.dtype, (k, arr.shape, arr.dtype)
        assert np.asarray(arr[...]).tobytes() == np_want.tobytes(), k
        chunk = spath / "probe" / f"probe.0.{k}" / ".".join(["c"] + ["0"] * w.dim())
        if w.numel():
            assert chunk.read_bytes() == np_want.astype(np_want.dtype.newbyteorder("<")).tobytes(), k
        else:
            assert not chunk.exists(), k


def test_resumed_run_keeps_its_probe_or_replaces_it(tmp_path):
    leaves = _odd_leaves()
    probe = {"x": leaves["bf16"], "y": leaves["conj_view"], "n": leaves["i16_0d"]}
    want = {k: v.detach().clone() for k, v in probe.items()}
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_batches("tensor", 6, last=None)
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, probe=probe) as rec:
        train(model, opt, LOSS, data[:2], rec=rec)
    # resumed without a probe: the first one stays, bit for bit
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, resume=True) as rec:
        train(model, opt, LOSS, data[2:4], rec=rec)
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1, 2, 3]
    assert sorted(run.probe) == sorted(want)
    for k, w in want.items():
        assert run.probe[k].dtype == w.dtype and _raw(run.probe[k]) == _raw(w), k
    # resumed with a new probe: same leaf names, other dtypes and shapes (a 0-d leaf becomes empty, ...)
    new = {
        "x": torch.zeros(0, 5, dtype=torch.int8),
        "y": torch.tensor(2.5, dtype=torch.float64),
        "n": torch.arange(12, dtype=torch.int64).reshape(3, 4),
    }
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, resume=True, probe=new, background=False) as rec:
        train(model, opt, LOSS, data[4:], rec=rec)
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1, 2, 3, 4, 5]
    assert sorted(run.probe) == sorted(new)
    spath = tmp_path / "run" / store.STORE_NAME
    for k, w in new.items():
        assert run.probe[k].dtype == w.dtype and tuple(run.probe[k].shape) == tuple(w.shape), k
        assert _raw(run.probe[k]) == _raw(w), k
        arr = zarr.open_array(str(spath / "probe" / f"probe.{k}"), mode="r")
        assert arr.shape == tuple(w.shape) and np.asarray(arr[...]).tobytes() == _raw(w), k
        # no chunk of the old leaf is left behind (an empty leaf has none at all)
        chunks = sorted(p.name for p in (spath / "probe" / f"probe.{k}").iterdir() if p.name != "zarr.json")
        assert chunks == ([".".join(["c"] + ["0"] * w.dim())] if w.numel() else []), (k, chunks)


def test_probe_key_with_a_slash_roundtrips(tmp_path):
    probe = ({"img/left": torch.arange(4.0), "img/right": torch.arange(3, dtype=torch.int32)}, torch.ones(2, 1))
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, probe=probe, background=False) as rec:
        train(model, opt, LOSS, make_batches("tensor", 1), rec=rec)
    got = trajscope.open_run(tmp_path / "run").probe
    assert torch.equal(got[0]["img/left"], probe[0]["img/left"])
    assert torch.equal(got[0]["img/right"], probe[0]["img/right"]) and got[0]["img/right"].dtype == torch.int32


def test_probe_keys_cannot_write_or_delete_outside_the_run_folder(tmp_path):
    """Probe leaf names come from the user's dict keys and become paths under ``probe/``. zarr
    refused '..' segments; the plain writer joins them into a path as they are: the leaf is
    written into a folder outside the run, and a resumed run's new probe ``rmtree``s it."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("not trajscope's")
    run_dir = tmp_path / "runs" / "run"
    key = "/" + "/".join([".."] * 5) + "/victim"  # probe/probe./../../../../../victim -> tmp_path/victim
    probe = {key: torch.ones(2)}
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for resume in (False, True):
            with Recorder(run_dir, model, opt, LOSS, export=False, probe=probe, background=False, resume=resume) as rec:
                train(model, opt, LOSS, make_batches("tensor", 1), rec=rec)
    assert (victim / "precious.txt").exists(), "a file outside the run folder was deleted"
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"], "files were written outside the run folder"
