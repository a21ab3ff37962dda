"""Crash safety (docs/spec.md §2): a recording process killed with SIGKILL at random moments.

Each trial forks a fresh child that records a small MLP (every=1; half of the trials with the
background writer thread, half writing on the training thread) and is SIGKILLed after a random
delay (0 to 1 s, stratified so early kills during store creation and late kills mid-stream both
happen). To keep the test fast the children are forked from one "zygote" process that has already
imported torch (~1.3 s per plain interpreter start on this machine). After every kill:

* the store opens (or, if the kill came before it was created, there is no run at all);
* the committed steps are 0..n-1 and every committed checkpoint is bit-exact: the test recomputes
  the same trajectory in-process (same seed, same deterministic batches, one thread);
* no half-written checkpoint is visible (every committed row has all its chunks);
* ``Recorder(resume=True)`` continues at step n, and ``resume=True, step=N`` (N <= last step)
  truncates later records and notes the restart; the new records are bit-exact too.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import trajscope
from tests.helpers.recording import (
    assert_bitexact,
    assert_state_bitexact,
    assert_tensors_bitexact,
    copy_state_dict,
    crash_batch,
    crash_model,
    crash_optimizer,
    crash_step,
)
from tests.helpers.scripts import ROOT, script_argv
from trajscope.cli.main import main as cli_main
from trajscope.io.layout import is_run
from trajscope.record.recorder import Recorder

TRIALS = 12
MAX_DELAY = 1.0


class Reference:
    """The crash trajectory recomputed in-process, extended on demand (θ_t, state before step t, batch, loss)."""

    def __init__(self):
        self.model = crash_model()
        self.opt = crash_optimizer(self.model)
        self.loss_fn = torch.nn.MSELoss()
        self.params, self.states, self.opt_dicts, self.losses = [], [], [], []
        self.names = {id(p): n for n, p in self.model.named_parameters()}

    def upto(self, n):
        while len(self.params) < n:
            t = len(self.params)
            self.params.append({k: p.detach().clone() for k, p in self.model.named_parameters()})
            self.states.append(
                {
                    self.names[id(p)]: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                    for p, st in self.opt.state.items()
                }
            )
            self.opt_dicts.append(copy_state_dict(self.opt))
            self.losses.append(crash_step(self.model, self.opt, self.loss_fn, t).item())
        return self

    def flat(self, t):
        return torch.cat([p.reshape(-1) for p in self.params[t].values()]).numpy()

    def trainer_at(self, t):
        """A model and optimizer in the reference state right before step t."""
        self.upto(t + 1)
        model = crash_model()
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(self.params[t][k])
        opt = crash_optimizer(model)
        # load_state_dict keeps the given tensors (no copy): hand it a copy, or the steps below
        # would update our stored reference state in place
        opt.load_state_dict(copy.deepcopy(self.opt_dicts[t]))
        return model, opt


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zygote():
    proc = subprocess.Popen(
        script_argv(Path(__file__).parent / "crash_zygote.py", str(ROOT)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def check_committed(run, ref, where):
    """Every committed checkpoint bit-exact; every committed row complete (no half-written record)."""
    n = len(run)
    assert list(run.steps) == list(range(n)), where
    ref.upto(n)
    if n == 0:
        return
    # all rows at once through the raw arrays (fast) ...
    stored = run.reader.root["params/float32"][:n]
    want = np.stack([ref.flat(t) for t in range(n)])
    assert stored.tobytes() == want.tobytes(), where
    assert list(run.losses) == ref.losses[:n], where
    for name in ("params/float32", "hparams", "batch/.0", "batch/.1"):
        for t in range(n):
            run.reader._read_row(name, t)  # raises on a missing or cut chunk
    # ... and a few full checkpoints through the public API
    for t in sorted({0, n // 2, n - 1}):
        ck = run.checkpoint(t)
        assert_tensors_bitexact(ck.params, ref.params[t], f"{where} theta_{t}")
        assert_state_bitexact(ck.optimizer_state, ref.states[t], f"{where} state_{t}")
        x, y = crash_batch(t)
        assert_bitexact(ck.inputs, x, f"{where} x_{t}")
        assert_bitexact(ck.targets, y, f"{where} y_{t}")
        assert ck.loss == ref.losses[t], where


def resume_and_check(path, ref, restart_at, where):
    """Continue the killed run for 3 steps, from its end or from an earlier step (a restart)."""
    n = len(trajscope.open_run(path))
    start = n if restart_at is None else restart_at
    model, opt = ref.trainer_at(start)
    loss_fn = torch.nn.MSELoss()
    kw = {} if restart_at is None else {"step": restart_at}
    with Recorder(path, model, opt, loss_fn, every=1, export=False, resume=True, **kw) as rec:
        assert rec.step == start, where
        for t in range(start, start + 3):
            crash_step(model, opt, loss_fn, t, rec)
    assert rec.failed is None, where
    assert not list(Path(path).rglob("*.partial")), f"{where}: stray partial files after resume"
    run = trajscope.open_run(path)
    assert list(run.steps) == list(range(start + 3)), where
    if restart_at is None:
        assert run.restarts == [], where
    else:
        assert len(run.restarts) == 1, where
        assert (run.restarts[0]["at_step"], run.restarts[0]["dropped_records"]) == (restart_at, n - restart_at), where
    check_committed(run, ref.upto(start + 3), where)


def test_sigkill_at_random_moments(tmp_path, zygote, one_thread):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    delays = [(i + rng.random()) * MAX_DELAY / TRIALS for i in range(TRIALS)]
    rng.shuffle(delays)
    ref = Reference()
    committed = []
    info_checked = False
    for i, delay in enumerate(delays):
        path = tmp_path / f"run{i}"
        mode = ("thread", "inline")[i % 2]
        where = f"trial {i} ({mode} writer, seed {seed}, kill after {delay:.3f} s)"
        zygote.stdin.write(f"{path} {mode}\n")
        zygote.stdin.flush()
        line = zygote.stdout.readline().split()
        assert line[0] == "pid", line
        time.sleep(delay)
        os.kill(int(line[1]), signal.SIGKILL)
        status = int(zygote.stdout.readline().split()[1])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{where}: child ended {status}"

        if not is_run(path):  # killed before the store existed: nothing half-made is visible
            assert not (path / "trajectory.zarr").exists(), where
            committed.append(None)
            continue
        run = trajscope.open_run(path)
        committed.append(len(run))
        check_committed(run, ref, where)
        if len(run) and not info_checked:
            info_checked = True
            assert cli_main(["info", str(path)]) == 0, where
        if (i // 2) % 2 == 0 or len(run) == 0:  # resume or restart, with either writer
            resume_and_check(path, ref, None, where + " resume")
        else:
            restart_at = rng.randrange(len(run))  # at or before the last recorded step
            resume_and_check(path, ref, restart_at, where + f" restart at {restart_at}")
    # the kills landed both before any commit and in the middle of recording
    opened = [c for c in committed if c is not None]
    assert sum(c > 0 for c in opened) >= TRIALS // 3, (seed, committed)
    print(f"seed {seed}: committed records per kill {committed}")
