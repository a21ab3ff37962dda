"""Integrity of a recorded run (format version 3: a CRC32C after every chunk and every shard index).

A corruption matrix on a freshly recorded run (both writer placements): every kind of damage is
caught, either by plain ``trajscope info`` (structure: array documents, shard files, their index
checksums and lengths; no record data read) or, for damaged values, by ``trajscope verify`` (every
record read, every checksum checked), which names the first damaged step. None is silent. Also:
plain zarr verifies the same checksums and reads the same values; format version 2 stores (the
shipped sample runs, no checksums) still open, analyse, resume and verify structurally; a reader
racing the writer's index rewrite reads again instead of reporting damage.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import trajscope
from tests.helpers.recording import assert_batch_equal, make_model, per_record_arrays, train
from trajscope.cli.info import info, verify
from trajscope.cli.main import main
from trajscope.errors import DamagedRecordError, TrajscopeError
from trajscope.io import layout as store
from trajscope.io import shards
from trajscope.io.packing import flatten_batch, pack
from trajscope.io.reader import TrajectoryReader
from trajscope.io.records import Snapshot
from trajscope.io.resultswriter import ResultsWriter
from trajscope.io.writer import TrajectoryWriter
from trajscope.record.recorder import Recorder

LOSS = torch.nn.MSELoss()
SIZES = (3, 5, 2, 6, 5, 4, 3, 6, 2, 4, 5, 3)  # 12 training steps; batches beyond 3 rows need 2 chunks
STEPS = list(range(0, 12, 2))  # every=2, window=1: rows 0..5 are steps 0, 2, ..., 10
SAMPLES = Path(__file__).resolve().parents[2] / "sample_data"


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(b, 4, generator=g), torch.randn(b, 3, generator=g)) for b in SIZES]


@pytest.fixture(scope="module", params=[False, True], ids=["inline", "thread"])
def recorded(request, tmp_path_factory) -> Path:
    """A small run: BufferNet (buffers of 3 dtypes), Adam (state from the second record on),
    batches of varying size, a probe batch; the inline one also has an exported program."""
    path = tmp_path_factory.mktemp("integrity") / "run"
    model = make_model("buffers")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    data = _batches()
    with Recorder(
        path, model, opt, LOSS, every=2, window=1, export=not request.param, background=request.param, probe=data[0]
    ) as rec:
        train(model, opt, LOSS, data, rec=rec)
    assert rec.failed is None
    assert list(trajscope.open_run(path).steps) == STEPS
    return path


@pytest.fixture
def run(recorded, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(recorded, dst)
    return dst


# --------------------------------------------------------------------------- damage helpers
def _spath(run: Path) -> Path:
    return run / store.STORE_NAME


def _geometry(run: Path, array: str) -> tuple[int, int, int]:
    """(rows per shard, index bytes, chunk bytes) of a per-record array, from its zarr.json as
    docs/format.md describes it (16 bytes per row + 4 for the index; values + 4 per chunk)."""
    doc = json.loads((_spath(run) / array / "zarr.json").read_text())
    cfg = doc["codecs"][0]["configuration"]
    S = doc["chunk_grid"]["configuration"]["chunk_shape"][0]
    values = math.prod(cfg["chunk_shape"][1:]) * np.dtype(doc["data_type"]).itemsize
    return S, 16 * S + 4, values + 4


def _first_shard(run: Path, array: str) -> Path:
    return next(p for p in sorted((_spath(run) / array).iterdir()) if p.name.startswith("c."))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def flip_value(array: str, row: int, where: str = "values") -> Callable[[Path], None]:
    """Flip one bit of row ``row``'s chunk (its values, or its CRC) in its first chunk column."""

    def damage(run: Path) -> None:
        S, index, chunk = _geometry(run, array)
        off = index + (row % S) * chunk + (chunk - 2 if where == "crc" else (chunk - 4) // 2)
        _flip(_first_shard(run, array), off)

    return damage


def flip_index(array: str, offset: int) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        _flip(_first_shard(run, array), offset)

    return damage


def cut_shard(array: str, row: int) -> Callable[[Path], None]:
    """Cut the shard file half-way through row ``row``'s chunk (a copy that stopped)."""

    def damage(run: Path) -> None:
        S, index, chunk = _geometry(run, array)
        with open(_first_shard(run, array), "r+b") as f:
            f.truncate(index + (row % S) * chunk + chunk // 2)

    return damage


def delete(rel: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        p = _spath(run) / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return damage


def delete_first_shard(array: str) -> Callable[[Path], None]:
    return lambda run: _first_shard(run, array).unlink()


def halve(rel: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        p = _spath(run) / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    return damage


def flip_probe(run: Path) -> None:
    chunk = _spath(run) / "probe" / "probe.0" / "c.0.0"
    _flip(chunk, 5)


def drop_probe_crc(run: Path) -> None:
    doc_path = _spath(run) / "probe" / "probe.0" / "zarr.json"
    doc = json.loads(doc_path.read_text())
    del doc["attributes"]["crc32c"]
    doc_path.write_text(json.dumps(doc))


def flip_program(run: Path) -> None:
    p = _spath(run) / "extra" / "model.pt2"
    _flip(p, p.stat().st_size // 3)


# (damage, who catches it, array, step (None: none named), words of the problem)
# "info": plain info fails (and so does verify); "verify": info passes (it reads no values), verify fails.
MATRIX = {
    "array doc deleted": (delete("params/float32/zarr.json"), "info", "params/float32", None, "zarr.json is missing"),
    "array doc truncated": (halve("hparams/zarr.json"), "info", "hparams", None, "zarr.json is unreadable"),
    "batch doc deleted": (delete("batch/.0/zarr.json"), "info", "batch/.0", None, "zarr.json is missing"),
    "state doc deleted": (delete("state/0/float32/zarr.json"), "info", "state/0/float32", None, "zarr.json is missing"),
    "shard deleted": (delete_first_shard("params/float32"), "info", "params/float32", 0, "c.0.0 is missing"),
    "hparams shard deleted": (
        delete_first_shard("hparams"),
        "info",
        "hparams",
        0,
        "is missing, the store was truncated",
    ),
    "state shard deleted": (delete_first_shard("state/0/float32"), "info", "state/0/float32", 2, "is missing"),
    "shard truncated": (
        cut_shard("params/float32", 3),
        "info",
        "params/float32",
        6,
        "cut short, the store was truncated",
    ),
    "batch shard truncated": (cut_shard("batch/.1", 4), "info", "batch/.1", 8, "cut short"),
    "index entry flipped": (
        flip_index("params/float32", 16 * 2 + 3),
        "info",
        "params/float32",
        0,
        "index checksum mismatch",
    ),
    "unused index entry flipped": (flip_index("hparams", 16 * 40), "info", "hparams", 0, "index checksum mismatch"),
    "index crc flipped": (
        flip_index("buffers/float32", 16 * 64 + 1),
        "info",
        "buffers/float32",
        0,
        "index checksum mismatch",
    ),
    "batch shape flipped": (flip_value("batch_shape/.0", 1), "info", "batch_shape/.0", 2, "checksum mismatch"),
    "probe chunk deleted": (delete("probe/probe.1/c.0.0"), "info", "probe/probe.1", None, "is missing"),
    "probe crc attribute removed": (drop_probe_crc, "info", "probe/probe.0", None, "no crc32c attribute"),
    "params value flipped": (flip_value("params/float32", 3), "verify", "params/float32", 6, "checksum mismatch"),
    "params crc flipped": (flip_value("params/float32", 3, "crc"), "verify", "params/float32", 6, "checksum mismatch"),
    "buffers value flipped": (flip_value("buffers/float32", 1), "verify", "buffers/float32", 2, "checksum mismatch"),
    "state value flipped": (flip_value("state/0/float32", 5), "verify", "state/0/float32", 10, "checksum mismatch"),
    "batch value flipped": (flip_value("batch/.0", 4), "verify", "batch/.0", 8, "checksum mismatch"),
    "hparams value flipped": (flip_value("hparams", 2), "verify", "hparams", 4, "checksum mismatch"),
    "probe value flipped": (flip_probe, "verify", "probe/probe.0", None, "checksum mismatch"),
}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_corruption_matrix(run, case, capsys):
    damage, caught_by, array, step, words = MATRIX[case]
    damage(run)
    if caught_by == "info":
        with pytest.raises(DamagedRecordError) as e:
            info(run)
        _check(e.value, run, array, step, words)
        assert main(["info", str(run)]) == 2
        _one_line(capsys.readouterr().err, array, words)
    else:
        info(run)  # structure intact: info reads no values
        capsys.readouterr()
    # verify always fails, naming the first damaged step (the first row it reads, for a document)
    with pytest.raises(DamagedRecordError) as e:
        verify(run)
    first = STEPS[0] if caught_by == "info" and step is None and not array.startswith("probe") else step
    if array == "state/0/float32" and first == 0:
        first = 2  # Adam has no state before its first update
    _check(e.value, run, array, first, words)
    assert main(["verify", str(run)]) == 2
    _one_line(capsys.readouterr().err, array, words)
    assert main(["info", "--verify", str(run)]) == 2
    _one_line(capsys.readouterr().err, array, words)


def _check(err: DamagedRecordError, run: Path, array: str, step: int | None, words: str) -> None:
    msg = str(err)
    assert "\n" not in msg and str(_spath(run)) in msg and words in msg, msg
    assert (err.array, err.step) == (array, step), msg
    assert (f"step {step} of {array} is damaged" if step is not None else f"{array} is damaged") in msg, msg


def _one_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trajscope: error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_damaged_record_is_local_other_steps_still_read(run):
    """A flipped value fails only its own checkpoint (what the analysis skips); the others read."""
    flip_value("params/float32", 3)(run)
    flip_value("batch/.1", 1)(run)
    r = trajscope.open_run(run)
    for bad, array in ((6, "params/float32"), (2, "batch/.1")):
        with pytest.raises(DamagedRecordError) as e:
            r.checkpoint(bad)
        assert (e.value.step, e.value.array, e.value.problem) == (bad, array, "checksum mismatch")
    for good in (0, 4, 8, 10):
        r.checkpoint(good)


def test_hparams_shard_deleted_fails_every_checkpoint_and_analyze_is_not_silent(run, capsys):
    delete_first_shard("hparams")(run)
    r = trajscope.open_run(run)
    for t in STEPS:
        with pytest.raises(DamagedRecordError, match=f"step {t} of hparams is damaged"):
            r.checkpoint(t)
    if not (_spath(run) / "extra" / "model.pt2").exists():
        return  # the thread run records no model to analyse with
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        rc = main(["analyze", str(run), "--no-progress", "--no-sharpness", "--trust"])
    err = capsys.readouterr().err
    # either the command fails naming the damage, or it analyses around it and warns per checkpoint
    assert rc != 0 and "hparams is damaged" in err or any("damaged" in str(w.message) for w in warned), err


def test_verify_names_the_first_damaged_step_info_the_first_structural_one(run):
    flip_value("params/float32", 4)(run)  # step 8, a value
    flip_value("batch/.0", 2)(run)  # step 4, a value
    cut_shard("hparams", 5)(run)  # step 10, structure
    with pytest.raises(DamagedRecordError) as e:
        info(run)
    assert (e.value.array, e.value.step) == ("hparams", 10)
    with pytest.raises(DamagedRecordError) as e:
        verify(run)
    assert (e.value.array, e.value.step) == ("batch/.0", 4)


@pytest.mark.parametrize("case", ["records value", "records index", "records shard deleted"])
def test_damaged_steps_list_is_a_plain_error_at_open(run, case):
    """``records`` holds the step of every row: damage there leaves nothing to read by step."""
    {
        "records value": flip_value("records", 3),
        "records index": flip_index("records", 7),
        "records shard deleted": delete_first_shard("records"),
    }[case](run)
    for call in (lambda: trajscope.open_run(run), lambda: info(run), lambda: verify(run)):
        with pytest.raises(TrajscopeError) as e:
            call()
        msg = str(e.value)
        assert not isinstance(e.value, DamagedRecordError) and "\n" not in msg, msg
        assert "of records is damaged" in msg and "cannot be opened" in msg, msg


@pytest.mark.parametrize(
    "case,words",
    [
        ("root deleted", "not a trajscope run"),
        ("root truncated", "cannot be opened"),
        ("commit deleted", "no commit marker"),
        ("commit truncated", "cannot be opened"),
    ],
)
def test_damaged_root_or_commit_is_a_plain_error_at_open(run, case, words, capsys):
    {
        "root deleted": delete("zarr.json"),
        "root truncated": halve("zarr.json"),
        "commit deleted": delete("commit/zarr.json"),
        "commit truncated": halve("commit/zarr.json"),
    }[case](run)
    for cmd in (["info", str(run)], ["verify", str(run)]):
        assert main(cmd) == 2
        _one_line(capsys.readouterr().err, words)


@pytest.mark.parametrize("recorded", [False], ids=["inline"], indirect=True)  # the run with a program
def test_exported_program_is_checked_by_verify(run):
    assert (_spath(run) / "extra" / "model.pt2").exists()
    verify(run)
    flip_program(run)
    info(run)
    with pytest.raises(DamagedRecordError) as e:
        verify(run)
    assert e.value.array == "extra/model.pt2" and e.value.step is None
    (_spath(run) / "extra" / "model.pt2").unlink()
    with pytest.raises(DamagedRecordError, match="extra/model.pt2 is damaged .the file is missing"):
        verify(run)


def test_good_run_info_and_verify(run, capsys):
    info(run)
    out = capsys.readouterr().out
    assert "CRC32C per chunk" in out and "none yet" in out
    verify(run)
    out = capsys.readouterr().out
    assert f"{len(STEPS)} records" in out and "every checksum matches" in out
    assert main(["verify", str(run)]) == 0 and main(["info", "--verify", str(run)]) == 0
    assert "every checksum matches" in capsys.readouterr().out


# --------------------------------------------------------------------------- plain zarr
def test_plain_zarr_reads_the_same_values(run):
    """Plain zarr decodes a version 3 store (checking every CRC it reads) to what trajscope reads."""
    r = TrajectoryReader(run)
    arrays = per_record_arrays(_spath(run))
    assert {
        "params/float32",
        "buffers/float32",
        "buffers/int64",
        "buffers/bool",
        "state/0/float32",
        "hparams",
        "records",
        "batch/.0",
        "batch/.1",
        "batch_shape/.0",
        "batch_shape/.1",
    } <= set(arrays)
    n = r.n_records
    for name, arr in arrays.items():
        rows = [t for t in range(n) if not name.startswith("state/") or r._records[t, 3] == 0]
        whole = arr[:n]
        for t in rows:
            shape = r._batch_shape(name.split("/")[1], t) if name.startswith("batch/") else None
            mine = r._read_row(name, t, shape)
            theirs = whole[t][tuple(slice(0, e) for e in mine.shape)]
            assert mine.dtype == theirs.dtype and mine.tobytes() == theirs.tobytes(), (name, t)
    for key in r.attrs["probe"]["dtypes"]:
        z = zarr.open_array(str(_spath(run) / "probe" / key), mode="r")[...]
        assert z.tobytes() == r._probe_leaf(key).tobytes()
    assert_batch_equal(trajscope.open_run(run).probe, _batches()[0], "probe")


def test_plain_zarr_rejects_a_damaged_chunk_or_index(run):
    flip_value("params/float32", 3)(run)
    arr = zarr.open_array(str(_spath(run) / "params" / "float32"), mode="r")
    with pytest.raises(Exception, match="checksum"):
        arr[3]
    np.testing.assert_array_equal(arr[2], TrajectoryReader(run)._read_row("params/float32", 2))
    flip_index("hparams", 5)(run)
    with pytest.raises(Exception, match="checksum"):
        zarr.open_array(str(_spath(run) / "hparams"), mode="r")[0]
    # the probe's chunk is plain values (its CRC is an attribute): zarr reads it, trajscope checks it
    flip_probe(run)
    zarr.open_array(str(_spath(run) / "probe" / "probe.0"), mode="r")[...]
    with pytest.raises(DamagedRecordError, match="probe/probe.0 is damaged .checksum mismatch"):
        trajscope.open_run(run).probe


# --------------------------------------------------------------------------- the analysis store
def _analysis(run: Path, rows: int = 2) -> None:
    with ResultsWriter(run, {"note": "test"}, {"fc1": 5}) as w:
        for t in STEPS[:rows]:
            w.append(t, {"loss": 1.0}, {"fc1": {"rho": np.ones(5)}})


@pytest.mark.parametrize(
    "case,words",
    [
        ("root deleted", "its zarr.json is missing"),
        ("root truncated", "its zarr.json is unreadable"),
        ("array doc deleted", "nodes/fc1/label/zarr.json is missing"),
        ("steps doc truncated", "steps/zarr.json is unreadable"),
    ],
)
def test_damaged_analysis_store_fails_info_with_rebuild_advice(run, case, words, capsys):
    _analysis(run)
    info(run)
    assert "2 checkpoints analysed, steps 0..2" in capsys.readouterr().out
    a = run / "analysis.zarr"
    {
        "root deleted": lambda: (a / "zarr.json").unlink(),
        "root truncated": lambda: (a / "zarr.json").write_text((a / "zarr.json").read_text()[:40]),
        "array doc deleted": lambda: (a / "nodes" / "fc1" / "label" / "zarr.json").unlink(),
        "steps doc truncated": lambda: (a / "steps" / "zarr.json").write_text("{"),
    }[case]()
    with pytest.raises(TrajscopeError) as e:
        info(run)
    msg = str(e.value)
    assert "\n" not in msg and "the analysis store is damaged" in msg and words in msg, msg
    assert f"trajscope analyze {run}" in msg and "rebuild" in msg, msg
    assert main(["info", str(run)]) == 2
    _one_line(capsys.readouterr().err, "analysis store is damaged")
    verify(run)  # the trajectory itself is intact


def test_incomplete_analysis_store_is_not_called_damaged(run, capsys):
    """An analysis that is behind the run, or created and not yet written, is no error."""
    with ResultsWriter(run, {}, {"fc1": 5}, expected=6):  # arrays made for 6 rows, none committed
        pass
    info(run)
    assert "no checkpoint analysed yet" in capsys.readouterr().out
    _analysis(run, rows=1)
    info(run)
    out = capsys.readouterr().out
    assert "1 checkpoints analysed" in out and "delete" not in out
    (run / "analysis.zarr").rename(run / "old")
    (run / "analysis.zarr").mkdir()  # an empty folder: nothing analysed
    info(run)
    assert "none yet" in capsys.readouterr().out


# --------------------------------------------------------------------------- readers racing the writer
class _TornOnce:
    """Stands in for ``os`` in trajscope.io.shards (the reads): the first ``n`` preads of a shard index return it
    half rewritten (new entry, old CRC), as a reader can see while the writer rewrites it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __getattr__(self, name):
        return getattr(os, name)

    def pread(self, fd, size, offset):
        data = os.pread(fd, size, offset)
        if offset == 0 and self.n > 0 and len(data) >= 16 * 64 + 4:
            self.n -= 1
            return data[: 16 * 63] + b"\x01" * 16 + data[16 * 64 :]
        return data


def test_a_torn_index_read_is_read_again(run, monkeypatch):
    r = TrajectoryReader(run)
    want = r._read_row("params/float32", 3)
    monkeypatch.setattr(shards, "os", _TornOnce(1))
    assert r._read_row("params/float32", 3).tobytes() == want.tobytes()
    monkeypatch.setattr(shards, "os", _TornOnce(2))  # the same twice: real damage
    with pytest.raises(DamagedRecordError, match="index checksum mismatch"):
        r._read_row("params/float32", 3)
    monkeypatch.setattr(shards, "os", _TornOnce(1))
    r.check_structure()


def test_damaged_record_error_pickles():
    e = DamagedRecordError("runs/x/trajectory.zarr", "params/float32", 12, "checksum mismatch")
    assert str(e) == (
        "runs/x/trajectory.zarr: step 12 of params/float32 is damaged (checksum mismatch): "
        "the record cannot be trusted; other steps can still be analysed"
    )
    back = pickle.loads(pickle.dumps(e))
    assert (back.step, back.array, back.problem, str(back)) == (12, "params/float32", "checksum mismatch", str(e))
    assert isinstance(back, TrajscopeError)


# --------------------------------------------------------------------------- format version 2
@pytest.fixture
def v2_run(tmp_path) -> Path:
    dst = tmp_path / "digits_mlp"
    shutil.copytree(SAMPLES / "digits_mlp", dst)
    return dst


def test_format_2_store_opens_analyses_and_verifies_structurally(v2_run, capsys):
    r = TrajectoryReader(v2_run)
    assert (r.format_version, r.checksums) == (2, False)
    info(v2_run)
    assert "none (format version 2)" in capsys.readouterr().out
    verify(v2_run)
    out = " ".join(capsys.readouterr().out.split())
    assert "no checksums" in out and "every record is present and readable" in out
    res = trajscope.analyze(v2_run, steps=(0, 6), sharpness=False)[v2_run]
    assert list(res.steps) == [0, 5]
    info(v2_run)  # its analysis store is looked at too
    assert "2 checkpoints analysed" in capsys.readouterr().out


def test_format_2_store_damage_is_caught_where_it_can_be(v2_run):
    shard = v2_run / store.STORE_NAME / "params" / "float32" / "c.1.0"
    with open(shard, "r+b") as f:
        f.truncate(16 * 64 + 10)  # rows 64.. of version 2: no CRCs anywhere
    steps = TrajectoryReader(v2_run).steps
    with pytest.raises(DamagedRecordError) as e:
        info(v2_run)
    assert (e.value.array, e.value.step) == ("params/float32", int(steps[64]))
    with pytest.raises(DamagedRecordError) as e:
        verify(v2_run)
    assert e.value.step == int(steps[64])


def test_format_2_store_resumes_without_checksums(v2_run):
    """A version 2 store keeps its layout when records are appended to it."""
    r = TrajectoryReader(v2_run)
    n = r.n_records
    last = trajscope.open_run(v2_run).checkpoint(int(r.steps[-1]))
    spec, leaves = flatten_batch(last.batch)
    snap = Snapshot(
        step=int(r.steps[-1]) + 1000,
        loss=0.5,
        params=pack(r.param_layout, [last.params[s.name] for s in r.param_layout]),
        buffers={},
        hparams=r._read_row("hparams", n - 1),
        state_layout=None,
        state={},
        batch_spec=spec,
        batch=leaves,
    )
    w = TrajectoryWriter(v2_run, resume=True)
    assert w.checksums is False
    w.append(snap)
    w.close()
    r2 = TrajectoryReader(v2_run)
    assert r2.n_records == n + 1 and r2.format_version == 2
    got = r2.params(n)
    assert all(torch.equal(got[k], v) for k, v in last.params.items())
    lay = r2._row_layout("params/float32")[0]
    shard = v2_run / store.STORE_NAME / "params" / "float32" / f"c.{n // 64}.0"
    assert shard.stat().st_size == 16 * 64 + (n % 64 + 1) * lay.value_bytes  # no CRC bytes
    arr = zarr.open_array(str(v2_run / store.STORE_NAME / "params" / "float32"), mode="r")
    assert arr[n].tobytes() == r2._read_row("params/float32", n).tobytes()
    r2.check_structure()
    r2.verify_records()
