"""The trajectory.zarr format: bit-exact round trips, the commit marker, and damaged stores."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import trajscope
from trajscope import TrajscopeError
from trajscope.io import trajectory as store
from trajscope.errors import DamagedRecordError
from trajscope.record.recorder import Recorder
from trajscope.io.trajectory import (Snapshot, TrajectoryReader, TrajectoryWriter, flatten_batch, make_layout,
                             numeric_hparams, pack, restore_hparams, unflatten_batch, unpack)

from tests.helpers.recording import (Ref, assert_batch_equal, assert_bitexact, assert_state_bitexact,
                               assert_tensors_bitexact, drop_chunks, make_batches, make_model, train)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def special_values(dtype: torch.dtype, n: int = 37) -> torch.Tensor:
    """Random values plus the ones a lossy path would break: -0.0, ±inf, NaN, subnormals, extremes."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    fi = torch.finfo(dtype)
    t[:7] = torch.tensor([-0.0, float("inf"), float("-inf"), float("nan"), fi.tiny / 4, fi.max, -fi.min],
                         dtype=torch.float64).to(dtype)
    return t


# --------------------------------------------------------------------------- pure format helpers
@pytest.mark.parametrize("dtype", DTYPES + [torch.int64, torch.bool, torch.uint8])
def test_pack_unpack_roundtrip(dtype):
    if dtype.is_floating_point:
        a = special_values(dtype).reshape(37, 1)
        b = special_values(dtype, 24).reshape(4, 6).t()          # non-contiguous
    else:
        a = torch.arange(37).reshape(37, 1).to(dtype)
        b = (torch.arange(24) % 3).reshape(4, 6).t().to(dtype)
    c = torch.ones((), dtype=torch.float32)                      # another pack, 0-d
    items = [("a", a), ("c", c), ("b", b)]
    layout = make_layout(items)
    packed = pack(layout, [t for _, t in items])
    rows = {k: store._to_numpy(v) for k, v in packed.items()}
    out = unpack(layout, rows)
    for name, t in items:
        assert_bitexact(out[name], t, name)
    a_before = a.clone()
    for flat in packed.values():
        flat.zero_()                  # the snapshot is a private copy: the optimizer's update cannot reach it
    assert_bitexact(a, a_before, "pack copies")


def test_batch_structure_roundtrip():
    x = {"ids": torch.arange(6).reshape(3, 2), "mask": torch.tensor([True, False, True]),
         "nested": [torch.ones(3), (torch.zeros(3, 1, dtype=torch.float16), None)]}
    y = (torch.randn(3), 2, 0.5, True)
    spec, leaves = flatten_batch((x, y))
    back = unflatten_batch(json.loads(json.dumps(spec)), dict(leaves))
    assert_batch_equal(back, (x, y))
    with pytest.raises(TypeError):
        flatten_batch((object(), None))


def test_hparams_roundtrip():
    g = {"params": [], "lr": torch.tensor(0.01), "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False,
         "foreach": None, "nesterov": True, "differentiable": False}
    hp = numeric_hparams(g)
    names = list(hp)
    back = restore_hparams(names, np.array([hp[k] for k in names]), ["amsgrad", "nesterov", "differentiable"])
    assert back == {"lr": pytest.approx(0.01), "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False,
                    "nesterov": True, "differentiable": False}
    assert isinstance(back["nesterov"], bool)


# --------------------------------------------------------------------------- writer / reader
def _meta(layout, hparam_names=("lr",)):
    return {"params": [s.to_json() for s in layout], "buffers": [], "hparam_names": list(hparam_names),
            "hparam_bools": [], "cadence": {"every": 1, "window": 1},
            "optimizer": {"class": "torch.optim.sgd.SGD", "name": "SGD", "groups": [{"params": [s.name for s in layout]}]},
            "model": {"spec": None, "kwargs": {}, "exported": None, "export_error": "none", "node_layers": []},
            "loss": None}


def _snap(step, layout, tensors, batch=None):
    spec, leaves = flatten_batch(batch) if batch is not None else (None, [])
    return Snapshot(step=step, loss=float(step) / 3, params=pack(layout, tensors), buffers={},
                    hparams=np.array([[0.1 * (step + 1)]]), state_layout=None, state={}, batch_spec=spec,
                    batch=leaves)


def test_writer_reader_special_values_all_dtypes_and_long_rows(tmp_path, monkeypatch):
    """Every dtype bit-exact (NaN, -0.0, inf, subnormals); rows longer than a chunk split and come
    back; rows span several shard files."""
    monkeypatch.setattr(store, "_MAX_CHUNK_ELEMS", 16)       # force several chunks per packed row
    monkeypatch.setattr(store, "_SHARD_ROWS", 2)             # and several shards per array
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
    with pytest.raises(DamagedRecordError, match="step 1 of params/float32 is damaged .its chunk is missing, the store was truncated"):
        TrajectoryReader(tmp_path).params(1)
    TrajectoryReader(tmp_path).params(2)
    # a shard file cut short (a copy that stopped half-way): its later rows are missing
    arr = r.root["params/float32"]
    shard = tmp_path / "trajectory.zarr" / "params/float32" / arr.metadata.encode_chunk_key((1, 0))
    with open(shard, "r+b") as f:
        f.truncate(f.seek(0, 2) - 1)
    with pytest.raises(DamagedRecordError, match="step 2 of params/float32 is damaged .its shard file is cut short, the store was truncated"):
        TrajectoryReader(tmp_path).params(2)
    TrajectoryReader(tmp_path).params(0)


def test_uncommitted_rows_are_invisible(tmp_path):
    """Chunks of a row whose commit never happened (a kill mid-record) are not visible."""
    items = [("w", torch.randn(3, 2))]
    layout = make_layout(items)
    w = TrajectoryWriter(tmp_path, _meta(layout))
    w.append(_snap(0, layout, [items[0][1]]))
    w.append(_snap(1, layout, [items[0][1] + 1]))
    w._write_commit(records=1, last_step=0)        # as if the process died right before the commit
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
    monkeypatch.setattr(store.os, "rename", die)
    with pytest.raises(KeyboardInterrupt):
        TrajectoryWriter(tmp_path / "run", _meta(layout))
    assert not store.is_run(tmp_path / "run")
    monkeypatch.undo()
    TrajectoryWriter(tmp_path / "run", _meta(layout))            # also clears the stray temporary store
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
            inputs = {**x, "ids": torch.arange(len(y)) * (t + 1), "keep": torch.arange(len(y)) % 2 == 0,
                      "temperature": torch.tensor(0.5 + t)}                      # a 0-d leaf
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
    leaves.update(ints=torch.arange(-5, 7, dtype=torch.int64), flags=torch.arange(9) % 3 == 0,
                  bytes_=torch.arange(250, 256, dtype=torch.uint8), scalar=torch.tensor(2.5),
                  empty=torch.zeros(0, 4), strided=torch.randn(4, 6).t())
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
    extra = {"u8": torch.randint(0, 255, (3, 5), generator=g, dtype=torch.uint8),
             "b": torch.rand(3, 2, generator=g) > 0.5, "i8": torch.randint(-100, 100, (3,), generator=g, dtype=torch.int8),
             "i16": torch.randint(-999, 999, (3, 2), generator=g, dtype=torch.int16),
             "i32": torch.randint(-99999, 99999, (3,), generator=g, dtype=torch.int32),
             "c64": torch.randn(3, 2, dtype=torch.complex64, generator=g)}
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
    given = [({"x": torch.randn(b, T, 4, generator=g), "mask": (torch.rand(T, generator=g) > 0.3).float()},
              torch.randn(b, 3, generator=g)) for b, T in [(3, 5), (2, 7), (4, 2), (3, 7)]]
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
    with Recorder(path, model, opt, loss_fn, export=False, model_spec="trajscope.zoo:mlp",
                  model_kwargs={"sizes": [4, 6, 3]}) as rec:
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
    with pytest.raises(TrajscopeError, match="format version 99"):       # nor is it resumed
        m = make_model("tensor")
        Recorder(path, m, torch.optim.SGD(m.parameters(), lr=0.1), resume=True)
    with pytest.raises(TrajscopeError, match="not a trajscope run"):
        trajscope.open_run(tmp_path)
    with pytest.raises(TrajscopeError, match="does not exist"):
        trajscope.open_run(tmp_path / "nope")


@pytest.mark.parametrize("spec,kwargs,name", [
    ("trajscope.zoo:mlp", '{"sizes": [4, 7, 3]}', "0.weight"),                 # wrong shape
    ("trajscope.zoo:mlp", '{"sizes": [4, 6, 3], "bias": false}', "0.bias"),   # missing parameter
    ("trajscope.zoo:mlp", '{"sizes": [4, 6, 3, 3]}', "4."),                   # extra parameter
])
def test_model_spec_mismatch_names_the_parameter(small_run, spec, kwargs, name):
    run = trajscope.open_run(small_run)
    with pytest.raises(TrajscopeError) as ei:
        run.model(spec, kwargs)
    assert name in str(ei.value) and "\n" not in str(ei.value)
    run.model()   # the recorded spec matches
