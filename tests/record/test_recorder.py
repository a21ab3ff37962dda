"""The Recorder against docs/spec.md §2: the contract loop, cadence, replay, resume and failure policies.

Long (over 400 lines) because it holds every case of trajscope.record.recorder: the commit
timer under races, open/close cycles and atexit follow the fold marker.
"""

from __future__ import annotations

# imports of the cases folded from test_review_device_timer_probe (below)
import random
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import trajscope
from tests.helpers.recording import (
    Ref,
    assert_batch_equal,
    assert_state_bitexact,
    assert_tensors_bitexact,
    make_batches,
    make_model,
    train,
)
from tests.helpers.recording import raw_bytes as _raw
from tests.helpers.scripts import run_script
from trajscope import TrajscopeError
from trajscope.io.writer import TrajectoryWriter
from trajscope.record import writer_thread as recorder_mod
from trajscope.record.recorder import Recorder

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum_dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05),
}
STEPS = 6


def reference(kind, opt_name, n=STEPS, sched=None, groups=None):
    model = make_model(kind)
    opt = OPTIMIZERS[opt_name](groups(model) if groups else model.parameters())
    s = sched(opt) if sched else None
    return train(model, opt, torch.nn.MSELoss(), make_batches(kind, n), sched=s, ref=Ref())


def record(path, kind, opt_name, n=STEPS, sched=None, groups=None, **kw):
    model = make_model(kind)
    opt = OPTIMIZERS[opt_name](groups(model) if groups else model.parameters())
    s = sched(opt) if sched else None
    loss_fn = torch.nn.MSELoss()
    kw.setdefault("export", False)
    with Recorder(path, model, opt, loss_fn, **kw) as rec:
        train(model, opt, loss_fn, make_batches(kind, n), rec=rec, sched=s)
    return model, opt, rec


def check_against(run, ref, steps, opt):
    """Every recorded checkpoint equals the reference before the update of its step."""
    assert list(run.steps) == list(steps)
    for ck in run:
        t = ck.step
        assert_tensors_bitexact(ck.params, ref.params[t], f"theta_{t}")
        assert_state_bitexact(ck.optimizer_state, ref.state[t], f"state_{t}")
        assert ck.loss == ref.losses[t], f"loss_{t}"
        assert [g["lr"] for g in ck.hparams] == ref.lrs[t], f"lr_{t}"
        for g, group in enumerate(opt.param_groups):
            for k in ("momentum", "dampening", "weight_decay", "eps", "nesterov", "betas"):
                if k in group:
                    assert ck.hparams[g][k] == (tuple(group[k]) if k == "betas" else group[k]), (t, g, k)


# --------------------------------------------------------------------------- the contract loop
@pytest.mark.parametrize("background", [False, True], ids=["inline", "thread"])
@pytest.mark.parametrize(
    "opt_name,kind,export",
    [
        ("sgd", "tensor", False),
        ("sgd_momentum_dampening", "tensor", False),
        ("sgd_nesterov_wd", "tensor", False),
        ("adam", "tensor", False),
        ("adamw", "tensor", False),
        ("adam", "tuple", True),
        ("sgd_nesterov_wd", "tuple", False),
        ("sgd_momentum_dampening", "dict", True),
        ("adamw", "dict", False),
    ],
)
def test_contract_loop_matches_reference(tmp_path, opt_name, kind, export, background):
    ref = reference(kind, opt_name)
    model, opt, rec = record(tmp_path / "run", kind, opt_name, export=export, background=background)
    assert rec.background is background
    assert rec.failed is None
    # recording does not perturb training
    assert_tensors_bitexact(dict(model.named_parameters()), ref.final, "final parameters")
    run = trajscope.open_run(tmp_path / "run")
    assert run.optimizer_class == f"{type(opt).__module__}.{type(opt).__qualname__}"
    check_against(run, ref, range(STEPS), opt)
    batches = make_batches(kind, STEPS)
    for t in range(STEPS):
        assert_batch_equal(run.checkpoint(t).batch, batches[t], f"batch_{t}")
    assert (
        run.checkpoint(STEPS - 1).inputs is not None and len(run.checkpoint(STEPS - 1).targets) == 3
    )  # short last batch
    if export:
        # The exported program (traced at the first batch) replays the recorded loss.
        assert run.attrs["model"]["exported"] == "extra/model.pt2", run.attrs["model"]["export_error"]
        m, lf = run.model(trust=True), run.loss_fn()
        for t in (0, STEPS - 1):
            ck = run.checkpoint(t)
            torch.testing.assert_close(run.replay_loss(ck, m, lf).item(), ck.loss, rtol=1e-6, atol=0)


def test_export_never_overlaps_an_optimizer_step(tmp_path):
    """torch.export sets process-global flags (torch.compiler.is_compiling()) while it runs; Adam then takes
    its compile-time code path and rounds differently. The export must not overlap training steps."""
    from trajscope.record import export as record_export

    record_export.export_model(make_model("tensor").eval(), make_batches("tensor", 1)[0][0], str(tmp_path / "warm.pt2"))
    n = 40
    ref = reference("tensor", "adam", n=n)
    model = make_model("tensor")
    opt = OPTIMIZERS["adam"](model.parameters())
    seen = []

    def observe(optimizer, args, kwargs):
        seen.append(torch.compiler.is_compiling())
        time.sleep(0.003)  # slow steps: a background export would overlap several of them

    opt.register_step_pre_hook(observe)
    loss_fn = torch.nn.MSELoss()
    with Recorder(tmp_path / "run", model, opt, loss_fn, export=True) as rec:
        train(model, opt, loss_fn, make_batches("tensor", n), rec=rec)
    assert len(seen) == n and not any(seen), f"steps taken while exporting: {[t for t, c in enumerate(seen) if c]}"
    assert_tensors_bitexact(dict(model.named_parameters()), ref.final, "final parameters")
    run = trajscope.open_run(tmp_path / "run")
    assert run.attrs["model"]["exported"] == "extra/model.pt2"
    check_against(run, ref, range(n), opt)


def test_export_by_default_only_without_model_spec(tmp_path):
    for name, kw in (
        ("spec", {"model_spec": "trajscope.zoo:mlp", "model_kwargs": {"sizes": [4, 6, 3]}}),
        ("nospec", {}),
    ):
        model = make_model("tensor")
        opt = OPTIMIZERS["sgd"](model.parameters())
        with Recorder(tmp_path / name, model, opt, torch.nn.MSELoss(), **kw) as rec:
            train(model, opt, torch.nn.MSELoss(), make_batches("tensor", 2), rec=rec)
    assert trajscope.open_run(tmp_path / "spec").attrs["model"]["exported"] is None
    assert not (tmp_path / "spec" / "trajectory.zarr" / "extra").exists()
    assert trajscope.open_run(tmp_path / "nospec").attrs["model"]["exported"] == "extra/model.pt2"


def test_param_groups_and_scheduler_record_the_lr_in_force(tmp_path):
    def groups(model):
        return [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[2].parameters(), "lr": 0.02, "momentum": 0.5, "dampening": 0.1},
        ]

    def opt_factory(ps):
        return torch.optim.SGD(ps, lr=0.3, momentum=0.9, nesterov=False)

    def sched(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 0.8**t, lambda t: 1.0 / (1 + t)])

    OPTIMIZERS["two_groups"] = opt_factory
    try:
        ref = reference("tensor", "two_groups", n=5, sched=sched, groups=groups)
        model, opt, _ = record(tmp_path / "run", "tensor", "two_groups", n=5, sched=sched, groups=groups)
    finally:
        del OPTIMIZERS["two_groups"]
    assert ref.lrs[3] == [0.1 * 0.8**3, 0.02 / 4]  # the reference captured the lr used by step 3
    run = trajscope.open_run(tmp_path / "run")
    assert run.param_groups == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    check_against(run, ref, range(5), opt)
    hp = run.checkpoint(2).hparams
    assert (hp[0]["momentum"], hp[1]["momentum"], hp[1]["dampening"]) == (0.9, 0.5, 0.1)
    assert hp[0]["lr"] != hp[1]["lr"]


# --------------------------------------------------------------------------- cadence
@pytest.mark.parametrize(
    "every,window,expect",
    [
        (1, None, list(range(12))),
        (5, None, [0, 1, 5, 6, 10, 11]),  # default window 2 when every > 1
        (4, 3, [0, 1, 2, 4, 5, 6, 8, 9, 10]),
        (6, 1, [0, 6]),
    ],
)
def test_cadence(tmp_path, every, window, expect):
    ref = reference("tensor", "sgd_momentum_dampening", n=12)
    model, opt, rec = record(tmp_path / "run", "tensor", "sgd_momentum_dampening", n=12, every=every, window=window)
    assert [t for t in range(12) if rec.records(t)] == expect
    run = trajscope.open_run(tmp_path / "run")
    assert (run.every, run.window) == (every, window or (1 if every == 1 else 2))
    check_against(run, ref, expect, opt)
    batches = make_batches("tensor", 12)
    for t in expect[-2:]:
        assert_batch_equal(run.checkpoint(t).batch, batches[t])


# --------------------------------------------------------------------------- replay
def test_replay_from_import_spec_and_trusted_export(tmp_path, other_user):
    sizes = [4, 6, 3]
    model, _, _ = record(
        tmp_path / "spec", "tensor", "adam", n=5, model_spec="trajscope.zoo:mlp", model_kwargs={"sizes": sizes}
    )
    with other_user():  # a run received from elsewhere: its exported program needs trust
        record(tmp_path / "exported", "tensor", "adam", n=5, export=True)
    record(tmp_path / "mine", "tensor", "adam", n=5, export=True)
    run = trajscope.open_run(tmp_path / "spec")
    m, lf = run.model(), run.loss_fn()
    assert isinstance(lf, torch.nn.MSELoss)
    for t in (0, 2, 4):
        ck = run.checkpoint(t)
        assert run.replay_loss(ck, m, lf).item() == pytest.approx(ck.loss, rel=1e-6, abs=0)
    # replay does not depend on the factory's own random init
    assert not torch.equal(dict(m.named_parameters())["0.weight"], run.params(4)["0.weight"])

    ex = trajscope.open_run(tmp_path / "exported")
    assert ex.attrs["model"]["spec"] is None and ex.attrs["model"]["exported"] == "extra/model.pt2"
    with pytest.raises(TrajscopeError, match="--trust") as ei:
        ex.model()
    assert "\n" not in str(ei.value)
    em = ex.model(trust=True)
    for t in (1, 3, 4):
        ck = ex.checkpoint(t)
        assert ex.replay_loss(ck, em, lf).item() == pytest.approx(ck.loss, rel=1e-6, abs=0)
    # the same kind of run recorded by this user is signed with the program's hash: no flag needed
    mine = trajscope.open_run(tmp_path / "mine")
    ck = mine.checkpoint(4)
    assert mine.replay_loss(ck, mine.model(), lf).item() == pytest.approx(ck.loss, rel=1e-6, abs=0)
    # an import spec given at analysis time overrides the export and needs no trust
    ck = ex.checkpoint(4)
    om = ex.model("trajscope.zoo:mlp", '{"sizes": [4, 6, 3]}')
    assert ex.replay_loss(ck, om, lf).item() == pytest.approx(ck.loss, rel=1e-6, abs=0)


# --------------------------------------------------------------------------- resume
def test_resume_continues_and_restart_truncates(tmp_path):
    path = tmp_path / "run"
    ref = reference("tensor", "adam", n=10)
    batches = make_batches("tensor", 10, last=None)
    model = make_model("tensor")
    opt = OPTIMIZERS["adam"](model.parameters())
    loss_fn = torch.nn.MSELoss()
    with Recorder(path, model, opt, loss_fn, export=False) as rec:
        train(model, opt, loss_fn, batches[:6], rec=rec)
    with pytest.raises(TrajscopeError, match="resume=True"):
        Recorder(path, model, opt, loss_fn, export=False)
    with Recorder(path, model, opt, loss_fn, export=False, resume=True) as rec:
        assert rec.step == 6
        train(model, opt, loss_fn, batches[6:], rec=rec)
    run = trajscope.open_run(path)
    assert list(run.steps) == list(range(10)) and run.restarts == []
    for t in range(10):
        assert_tensors_bitexact(run.params(t), ref.params[t], f"theta_{t}")

    # a resume the store refuses (different model) must not truncate anything
    other = make_model("tuple")
    with pytest.raises(TrajscopeError, match="parameters differ"):
        Recorder(path, other, torch.optim.SGD(other.parameters(), lr=0.1), loss_fn, resume=True, step=2)
    assert list(trajscope.open_run(path).steps) == list(range(10))
    # ... nor a different optimizer (its hyperparameter columns would be misread)
    with pytest.raises(TrajscopeError, match="optimizer differs.*Adam.*SGD"):
        Recorder(path, model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, resume=True, step=2)
    assert list(trajscope.open_run(path).steps) == list(range(10))

    # training restarts from step 7: records 7.. are replaced, the restart is noted
    model2 = make_model("tensor")
    opt2 = OPTIMIZERS["adam"](model2.parameters())
    train(model2, opt2, loss_fn, batches[:7])
    with Recorder(path, model2, opt2, loss_fn, export=False, resume=True, step=7) as rec:
        assert rec.step == 7
        train(model2, opt2, loss_fn, batches[7:9], rec=rec)
    run = trajscope.open_run(path)
    assert list(run.steps) == list(range(9))
    assert len(run.restarts) == 1 and run.restarts[0]["at_step"] == 7 and run.restarts[0]["dropped_records"] == 3
    for t in (6, 7, 8):
        assert_tensors_bitexact(run.params(t), ref.params[t], f"theta_{t}")
        assert_state_bitexact(run.checkpoint(t).optimizer_state, ref.state[t], f"state_{t}")

    # overwrite replaces the run
    with Recorder(path, model2, opt2, loss_fn, export=False, overwrite=True) as rec:
        train(model2, opt2, loss_fn, batches[:2], rec=rec)
    run = trajscope.open_run(path)
    assert list(run.steps) == [0, 1] and run.restarts == []


# --------------------------------------------------------------------------- failure policies
@pytest.mark.parametrize("where", ["writer_thread", "writer_inline", "training_thread"])
def test_writer_failure_warns_once_and_training_finishes(tmp_path, monkeypatch, where):
    """A failing disk mid-run: training is untouched, one RuntimeWarning, the committed part stays readable."""
    fail_at = 3
    if where.startswith("writer"):
        real_array = TrajectoryWriter._array

        def failing_array(self, name, *a, **k):
            # record `fail_at` dies half-way: its parameter chunks are written, then the disk is full
            if self.records == fail_at and name.startswith(("state", "hparams")):
                raise OSError(28, "No space left on device")
            return real_array(self, name, *a, **k)

        monkeypatch.setattr(TrajectoryWriter, "_array", failing_array)
    else:
        real_snapshot = Recorder._snapshot

        def failing_snapshot(self, step):
            if step == fail_at:
                raise OSError(28, "No space left on device")
            return real_snapshot(self, step)

        monkeypatch.setattr(Recorder, "_snapshot", failing_snapshot)

    ref = reference("tensor", "sgd_momentum_dampening", n=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt, rec = record(
            tmp_path / "run", "tensor", "sgd_momentum_dampening", n=8, background=where != "writer_inline"
        )
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert "No space left on device" in str(runtime[0].message) and "Training continues" in str(runtime[0].message)
    assert rec.failed and "No space left" in rec.failed
    assert_tensors_bitexact(dict(model.named_parameters()), ref.final, "training unaffected")
    run = trajscope.open_run(tmp_path / "run")
    check_against(run, ref, range(fail_at), opt)  # the half-written record is not visible


def _slow_writer(monkeypatch, delay):
    real_append = TrajectoryWriter.append

    def slow_append(self, snap, *args, **kwargs):
        time.sleep(delay)
        return real_append(self, snap, *args, **kwargs)

    monkeypatch.setattr(TrajectoryWriter, "append", slow_append)


def test_when_behind_skip_notes_skipped_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # rich would wrap the info table at 80 columns
    _slow_writer(monkeypatch, 0.03)
    ref = reference("tensor", "sgd", n=14)
    model = make_model("tensor")
    opt = OPTIMIZERS["sgd"](model.parameters())
    loss_fn = torch.nn.MSELoss()
    batches = make_batches("tensor", 14)
    with Recorder(
        tmp_path / "run", model, opt, loss_fn, export=False, background=True, when_behind="skip", memory_budget=1
    ) as rec:
        for t in range(14):
            train(model, opt, loss_fn, batches[t : t + 1], rec=rec)
            if t in (5, 9):
                rec.flush()  # let the writer catch up: the next step is recorded again
    run = trajscope.open_run(tmp_path / "run")
    recorded, skipped = list(run.steps), list(run.skipped_steps)
    assert skipped and len(recorded) >= 3, (recorded, skipped)
    assert sorted(recorded + skipped) == list(range(14)) and rec.n_skipped == len(skipped)
    assert {0, 6, 10} <= set(recorded)
    check_against(run, ref, recorded, opt)

    from trajscope.cli.main import main

    assert main(["info", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "skipped steps" in out and f"{len(skipped)} ({', '.join(map(str, skipped[:3]))}" in out


def test_when_behind_wait_records_every_step(tmp_path, monkeypatch):
    _slow_writer(monkeypatch, 0.02)
    ref = reference("tensor", "sgd", n=6)
    _, opt, rec = record(tmp_path / "run", "tensor", "sgd", n=6, background=True, memory_budget=1)
    run = trajscope.open_run(tmp_path / "run")
    assert len(run.skipped_steps) == 0 and rec.n_skipped == 0
    check_against(run, ref, range(6), opt)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "thread"])
def test_records_become_visible_while_training_runs(tmp_path, background):
    """The commit marker advances on its own (within ~0.25 s; at once when written on the training
    thread), and flush() commits at once."""
    model = make_model("tensor")
    opt = OPTIMIZERS["sgd"](model.parameters())
    loss_fn = torch.nn.MSELoss()
    batches = make_batches("tensor", 6)
    with Recorder(tmp_path / "run", model, opt, loss_fn, export=False, background=background) as rec:
        train(model, opt, loss_fn, batches[:3], rec=rec)
        deadline = time.monotonic() + 5
        while len(trajscope.open_run(tmp_path / "run")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(trajscope.open_run(tmp_path / "run").steps) == [0, 1, 2]
        train(model, opt, loss_fn, batches[3:], rec=rec)
        rec.flush()
        assert list(trajscope.open_run(tmp_path / "run").steps) == list(range(6))


def test_writer_placement_follows_free_cores(monkeypatch):
    """Default placement: a writer thread only where it does not preempt torch's own threads."""
    from trajscope.record import writer_thread as recorder_mod

    model = make_model("tensor")
    monkeypatch.setattr(recorder_mod.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    for threads, expected in [(4, False), (2, True), (8, False)]:
        monkeypatch.setattr(recorder_mod.torch, "get_num_threads", lambda n=threads: n)
        assert recorder_mod._free_core_for_writer(model) is expected, threads
    meta = torch.nn.Linear(2, 2, device="meta")  # parameters off the CPU: the CPU is free
    assert recorder_mod._free_core_for_writer(meta) is True


def test_bad_arguments_raise_before_training(tmp_path):
    model = make_model("tensor")
    opt = OPTIMIZERS["sgd"](model.parameters())
    with pytest.raises(ValueError):
        Recorder(tmp_path / "a", model, opt, every=0)
    with pytest.raises(ValueError):
        Recorder(tmp_path / "b", model, opt, when_behind="drop")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ==============================================================================================
# folded from test_review_device_timer_probe (adversarial review of device handling, the
# commit timer and the plain-Zarr probe writer): the part about this module
# ==============================================================================================
HERE = Path(__file__).resolve().parent
LOSS = nn.MSELoss()


# --------------------------------------------------------------------------------------------
# recorder: the inline writer's commit timer
# --------------------------------------------------------------------------------------------
def _alive_timers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]


def _step(model, opt, rec, x, y) -> None:
    loss = LOSS(model(x), y)
    opt.zero_grad()
    loss.backward()
    rec.batch(x, y)
    opt.step()


class _TimerWaitsLock:
    """A Lock for which the commit timer thread queues behind ``gate`` (one order a plain Lock
    may also take: which waiter gets a released Lock first is up to the scheduler)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gate = threading.Event()
        self.timer_waiting = threading.Event()

    def __enter__(self):
        if isinstance(threading.current_thread(), threading.Timer):
            self.timer_waiting.set()
            self.gate.wait(10)
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def test_timer_that_fired_while_training_committed_leaves_no_timer_after_close(tmp_path, monkeypatch):
    """Timer T1 fires and waits for the lock while the next step's pre-hook commits (cancelling
    T1, already running) and arms T2. When T1 gets the lock, training looks recent and it arms
    T3 *over* T2: T2 is no longer referenced, close() cancels and joins only T3, and T2 is still
    alive after close() returns (the daemon thread the change is meant to rule out)."""
    monkeypatch.setattr(recorder_mod, "_COMMIT_INTERVAL", 1.0)  # room for slow steps: the order is fixed
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_batches("tensor", 3, last=None)
    rec = Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False)
    before = set(_alive_timers())
    lock = _TimerWaitsLock()
    rec._lock = lock
    try:
        _step(model, opt, rec, *data[0])  # first record: committed at once
        _step(model, opt, rec, *data[1])  # within the interval: the timer T1 is armed
        t1 = rec._timer
        assert t1 is not None
        assert lock.timer_waiting.wait(5)  # T1 fired and waits for the lock
        _step(model, opt, rec, *data[2])  # pre-hook commits and cancels T1; the record arms T2
        lock.gate.set()
        t1.join(5)
        rec.close()
        leaked = [t for t in _alive_timers() if t not in before]
        assert leaked == [], f"timer threads alive after close(): {leaked}"
        assert list(trajscope.open_run(tmp_path / "run").steps) == [0, 1, 2]
    finally:
        lock.gate.set()
        rec.close()
        for t in _alive_timers():  # let a leaked timer run out here (it does nothing after close)
            if t not in before:
                t.join(5)


def test_many_open_close_cycles_and_close_as_the_timer_fires_leave_no_timer(tmp_path):
    """close() at random moments around the timer's expiry (before, at, after), many times: no
    timer thread outlives close(), and every record is committed."""
    rnd = random.Random(0)
    before = set(_alive_timers())
    data = make_batches("tensor", 3, last=None)
    ref_model = make_model("tensor")
    ref = train(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1), LOSS, data, ref=Ref())
    armed = 0
    for i in range(12):
        model = make_model("tensor")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = Recorder(tmp_path / f"r{i}", model, opt, LOSS, export=False, background=False)
        for x, y in data:
            _step(model, opt, rec, x, y)
        armed += rec._timer is not None  # the last records wait for the timer
        time.sleep(rnd.uniform(0.0, 0.35))
        rec.close()
        assert rec._timer is None
        assert [t for t in _alive_timers() if t not in before] == [], i
        run = trajscope.open_run(tmp_path / f"r{i}")
        assert list(run.steps) == [0, 1, 2]
        for r in range(3):
            for k, v in ref.params[r].items():
                assert _raw(run.params(r)[k]) == _raw(v), (i, r, k)
    assert armed >= 6, armed


def test_recorder_left_open_is_closed_by_atexit_without_zarr_threads(tmp_path):
    """A Recorder never closed: the interpreter exits cleanly (no SIGABRT) with its timer
    pending, atexit commits the last records, and the training process never started zarr's
    event-loop or pool threads (the probe is written without zarr)."""
    done = run_script(HERE / "atexit_child.py", str(tmp_path / "run"), timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert "Fatal Python error" not in done.stderr
    assert "TIMER True" in done.stdout, done.stdout
    threads = next(l for l in done.stdout.splitlines() if l.startswith("THREADS"))
    assert "zarr" not in threads and "asyncio" not in threads, threads
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1, 2, 3, 4]
    probe = run.probe
    assert torch.equal(probe[0], torch.arange(6.0).reshape(2, 3))
    assert probe[1]["flag"].dtype == torch.bool and bool(probe[1]["flag"]) and probe[1]["flag"].shape == ()
    assert probe[1]["bf"].dtype == torch.bfloat16 and torch.equal(probe[1]["bf"], torch.ones(2, dtype=torch.bfloat16))
