"""The SIGKILL soak rig shared by ``test_sigkill.py`` (a few kills, in CI) and ``soak.py`` (by hand).

A "zygote" process imports torch once and forks one child per kill (a plain interpreter start
costs ~1.3 s here). The child trains the crash-test MLP of ``tests.helpers.recording`` under a Recorder
(``every=1``, or ``every=K, window=2``; background writer thread or writing on the training thread)
and, right before each ``opt.step()``, appends ``step monotonic-time sha256(θ_t)`` to a log file,
flushed and fsync'd. The parent waits until the Recorder exists, SIGKILLs the child after a random
delay and checks, against that log:

* the run opens with ``trajscope.open_run``;
* its committed steps are the cadence's steps among the logged ones, in order, with none missing
  in between (a prefix), and each one's parameters hash to the logged θ_t (bit-exact);
* nothing recorded is lost beyond the commit window: every recorded step logged more than
  ``LOSS_WINDOW`` seconds before the kill is committed (the documented bound is the commit
  marker's ``_COMMIT_INTERVAL`` of 0.25 s; see ``LOSS_WINDOW`` for the margin);
* ``trajscope.analyze`` analyses the last committed checkpoints;
* ``Recorder(..., resume=True)`` continues the run from the step after the last committed one
  (the model and optimizer restored from an in-process recomputation of the same trajectory), and
  the continued run opens with every step bit-exact.

Kills during store creation are test_crash.py's business: here the kill always comes after the
Recorder was constructed, so every kill must leave a run that opens.

Imported by path from the zygote too: no pytest here.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # the repository root: tests.helpers imports from there
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tests.helpers.recording import CRASH_SIZES, crash_batch, crash_model, crash_optimizer  # noqa: E402
from trajscope.record.writer_thread import _COMMIT_INTERVAL  # noqa: E402

# A recorded step is committed at most _COMMIT_INTERVAL (0.25 s, documented in the Recorder and
# docs/guide.md) after it was written, while steps keep coming. LOSS_WINDOW adds 0.5 s for what
# the interval does not count on a loaded 2-core machine: the record's own write, the next step
# (inline writer: the pre-hook of the next step commits), records still queued to a background
# writer that fell behind (bounded by memory_budget, not by time), the fsync of the log line and
# scheduling. Observed over 2 x 200 kills: at most 0.29 s (inline) and 0.42 s (thread).
LOSS_WINDOW = _COMMIT_INTERVAL + 0.5
EVERY_K = 5  # the sparse cadence: every=5, window=2
MODEL_SPEC = {"model_spec": "trajscope.zoo:mlp", "model_kwargs": {"sizes": CRASH_SIZES}}


def theta_hash(tensors) -> str:
    """SHA-256 of the parameters' bytes, in the model's parameter order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def child(run_dir: str, log_path: str, background: bool, every: int, window: int, steps: int = 10**7) -> None:
    """Train under a Recorder, logging ``step time sha256(θ_t)`` (fsync'd) before each update."""
    from trajscope.record.recorder import Recorder

    model = crash_model()
    opt = crash_optimizer(model)
    loss_fn = torch.nn.MSELoss()
    params = list(model.parameters())
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rec = Recorder(
        run_dir, model, opt, loss_fn, every=every, window=window, export=False, background=background, **MODEL_SPEC
    )
    os.write(fd, b"start\n")
    os.fsync(fd)
    for t in range(steps):
        x, y = crash_batch(t)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        rec.batch(x, y)
        os.write(fd, f"{t} {time.monotonic():.6f} {theta_hash(params)}\n".encode())
        os.fsync(fd)
        opt.step()
    rec.close()
    os.close(fd)


class Zygote:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "zygote.py"), str(ROOT), str(HERE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"the zygote did not start (said {line!r})")

    def spawn(self, run_dir: Path, log: Path, mode: str, every: int, window: int) -> int:
        self.proc.stdin.write(f"{run_dir} {log} {mode} {every} {window}\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "pid", (word, pid)
        return int(pid)

    def reap(self) -> int:
        word, status = self.proc.stdout.readline().split()
        assert word == "status", (word, status)
        return int(status)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Reference:
    """The child's trajectory recomputed in this process (one thread: bit-identical to the child)."""

    def __init__(self) -> None:
        self.model = crash_model()
        self.opt = crash_optimizer(self.model)
        self.loss_fn = torch.nn.MSELoss()
        self.hashes: list[str] = []
        self.params: list[dict[str, torch.Tensor]] = []
        self.opt_dicts: list[dict] = []

    def upto(self, n: int) -> Reference:
        while len(self.hashes) < n:
            t = len(self.hashes)
            self.params.append({k: p.detach().clone() for k, p in self.model.named_parameters()})
            self.hashes.append(theta_hash(self.model.parameters()))
            self.opt_dicts.append(copy.deepcopy(self.opt.state_dict()))
            x, y = crash_batch(t)
            loss = self.loss_fn(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return self

    def trainer_at(self, t: int):
        """A fresh model and optimizer in the state right before step t."""
        self.upto(t + 1)
        model = crash_model()
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(self.params[t][k])
        opt = crash_optimizer(model)
        opt.load_state_dict(copy.deepcopy(self.opt_dicts[t]))  # it keeps the given tensors: a copy
        return model, opt


@dataclasses.dataclass
class Kill:
    """What one kill left, and what the checks found (empty ``problems``: all good)."""

    mode: str
    every: int
    delay: float
    logged: int = 0  # steps the child logged before the kill
    committed: int = 0  # records the killed run holds
    uncommitted: int = 0  # recorded (cadence) logged steps that were not committed
    oldest_lost_age: float = 0.0  # seconds between the oldest uncommitted logged step and the kill
    opened: bool = False
    lost_beyond_window: int = 0
    hash_mismatches: int = 0
    analyze_ok: bool = False
    resume_ok: bool = False
    problems: list[str] = dataclasses.field(default_factory=list)


def read_log(path: Path) -> tuple[bool, dict[int, tuple[float, str]]]:
    """Whether the Recorder was constructed, and step -> (time, hash) of every complete line."""
    started, steps = False, {}
    if not path.exists():
        return started, steps
    for line in path.read_text().splitlines():
        if line == "start":
            started = True
            continue
        parts = line.split()
        if len(parts) == 3 and len(parts[2]) == 64:  # a line cut by the kill is not counted
            steps[int(parts[0])] = (float(parts[1]), parts[2])
    return started, steps


def kill_one(
    zygote: Zygote, ref: Reference, folder: Path, mode: str, every: int, delay: float, resume_steps: int | None = None
) -> Kill:
    """One child: record, SIGKILL ``delay`` s after the Recorder exists, check everything."""
    import trajscope
    from trajscope.record.recorder import Recorder

    window = 1 if every == 1 else 2
    run_dir, log = folder / "run", folder / "theta.log"
    k = Kill(mode=mode, every=every, delay=delay)
    folder.mkdir(parents=True, exist_ok=True)
    pid = zygote.spawn(run_dir, log, mode, every, window)
    deadline = time.monotonic() + 60
    while not read_log(log)[0]:
        try:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                zygote.reap()
                k.problems.append("the child did not construct its Recorder within 60 s")
                return k
            os.kill(pid, 0)
        except ProcessLookupError:
            k.problems.append(f"the child ended before its Recorder was constructed (status {zygote.reap()})")
            return k
        time.sleep(0.002)
    time.sleep(delay)
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    status = zygote.reap()
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        k.problems.append(f"the child ended by itself (status {status}) before the kill")
    _, logged = read_log(log)
    k.logged = len(logged)
    if sorted(logged) != list(range(len(logged))):
        k.problems.append("the log of the child has holes")
        return k
    ref.upto(len(logged))
    if any(ref.hashes[t] != h for t, (_, h) in logged.items()):
        k.problems.append("the rig is broken: the in-process trajectory differs from the child's")
        return k

    # -- the killed run ---------------------------------------------------------------------------
    try:
        run = trajscope.open_run(run_dir)
        steps = [int(s) for s in run.steps]
        k.opened = True
    except Exception as e:
        k.problems.append(f"open_run failed: {type(e).__name__}: {e}")
        return k
    k.committed = len(steps)
    cadence = [t for t in sorted(logged) if t % every < window]
    if steps != cadence[: len(steps)]:
        k.problems.append(f"committed steps are not the leading recorded steps: {steps[:8]}... of {cadence[:8]}...")
    for t in steps:
        try:
            got = theta_hash(run.params(t)[n] for n, _ in ref.model.named_parameters())
        except Exception as e:
            k.problems.append(f"step {t} does not read: {type(e).__name__}: {e}")
            k.hash_mismatches += 1
            continue
        if t not in logged or got != logged[t][1]:
            k.hash_mismatches += 1
    lost = [t for t in cadence if t not in set(steps)]
    k.uncommitted = len(lost)
    if lost:
        k.oldest_lost_age = t_kill - logged[lost[0]][0]
    k.lost_beyond_window = sum(t_kill - logged[t][0] > LOSS_WINDOW for t in lost)
    if k.lost_beyond_window:
        k.problems.append(
            f"{k.lost_beyond_window} recorded step(s) logged more than {LOSS_WINDOW} s before the kill "
            f"are not committed (oldest {k.oldest_lost_age:.3f} s)"
        )
    if k.hash_mismatches:
        k.problems.append(f"{k.hash_mismatches} committed step(s) differ from the logged θ_t")

    # -- analysis of the last committed checkpoints -------------------------------------------------
    pairs = [s for s in steps if s + 1 in set(steps)]
    if pairs:
        try:
            (res,) = trajscope.analyze(run_dir, steps=(pairs[-min(3, len(pairs))], None), sharpness=False).values()
            k.analyze_ok = [int(s) for s in res.steps] == pairs[-min(3, len(pairs)) :]
            if not k.analyze_ok:
                k.problems.append(f"analyze gave steps {list(res.steps)}, wanted {pairs[-3:]}")
        except Exception as e:
            k.problems.append(f"analyze failed: {type(e).__name__}: {e}")
    else:
        k.analyze_ok = True  # nothing analysable (fewer than two consecutive records): nothing to fail

    # -- resume -------------------------------------------------------------------------------------
    start = steps[-1] + 1 if steps else 0
    n_more = resume_steps if resume_steps is not None else (3 if every == 1 else EVERY_K + 2)
    try:
        model, opt = ref.trainer_at(start)
        loss_fn = torch.nn.MSELoss()
        with Recorder(
            run_dir,
            model,
            opt,
            loss_fn,
            every=every,
            window=window,
            export=False,
            resume=True,
            background=mode == "thread",
            **MODEL_SPEC,
        ) as rec:
            if rec.step != start:
                raise AssertionError(f"resumed at step {rec.step}, not {start}")
            for t in range(start, start + n_more):
                x, y = crash_batch(t)
                loss = loss_fn(model(x), y)
                opt.zero_grad()
                loss.backward()
                rec.batch(x, y)
                opt.step()
        if rec.failed:
            raise AssertionError(f"recording failed after resume: {rec.failed}")
        run2 = trajscope.open_run(run_dir)
        want = steps + [t for t in range(start, start + n_more) if t % every < window]
        got = [int(s) for s in run2.steps]
        if got != want:
            raise AssertionError(f"resumed run holds steps {got[-6:]}, wanted {want[-6:]}")
        ref.upto(start + n_more)
        names = [n for n, _ in ref.model.named_parameters()]
        bad = [t for t in want if theta_hash(run2.params(t)[n] for n in names) != ref.hashes[t]]
        if bad:
            raise AssertionError(f"resumed run: steps {bad[:5]} differ from the trajectory")
        if run2.restarts:
            raise AssertionError(f"a plain resume noted restarts {run2.restarts}")
        if list(run_dir.rglob("*.partial")):
            raise AssertionError("stray .partial files after the resumed run closed")
        k.resume_ok = True
    except Exception as e:
        k.problems.append(f"resume failed: {type(e).__name__}: {e}")
    return k


def plan(n_kills: int, modes: tuple[str, ...], max_delay: float, seed: int) -> list[tuple[str, int, float]]:
    """(mode, every, delay) per kill: modes interleaved, each mode alternating every=1 and every=K,
    delays stratified over [0, max_delay] per mode so short and long runs both happen."""
    rng = random.Random(seed)
    per_mode = {}
    for mode in modes:
        delays = [(i + rng.random()) * max_delay / n_kills for i in range(n_kills)]
        rng.shuffle(delays)
        per_mode[mode] = [(mode, 1 if i % 2 == 0 else EVERY_K, d) for i, d in enumerate(delays)]
    return [per_mode[m][i] for i in range(n_kills) for m in modes]


def summary(kills: list[Kill]) -> str:
    """The figures per writer mode and cadence, as a table."""
    rows = [
        "mode    every  kills  opened  lost>window  hash-mismatch  analyze-fail  resume-fail  "
        "records/kill (min-max)  uncommitted at kill (max)  oldest uncommitted (s)"
    ]
    groups: dict[tuple[str, int | str], list[Kill]] = {}
    for k in kills:
        groups.setdefault((k.mode, k.every), []).append(k)
        groups.setdefault((k.mode, "all"), []).append(k)
    for (mode, every), ks in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        rec = [k.committed for k in ks]
        rows.append(
            f"{mode:7} {str(every):>5}  {len(ks):5}  {sum(k.opened for k in ks):3}/{len(ks):<3} "
            f"{sum(k.lost_beyond_window for k in ks):11}  {sum(k.hash_mismatches for k in ks):13}  "
            f"{sum(not k.analyze_ok for k in ks):12}  {sum(not k.resume_ok for k in ks):11}  "
            f"{sum(rec) / len(rec):8.0f} ({min(rec)}-{max(rec)})        "
            f"{max(k.uncommitted for k in ks):10}                 {max(k.oldest_lost_age for k in ks):.3f}"
        )
    return "\n".join(rows)
