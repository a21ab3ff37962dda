"""Writing snapshots to the store: on a background writer thread, or on the training thread with a
commit timer, and the commit marker's cadence (:data:`_COMMIT_INTERVAL`)."""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from typing import Any

import torch
from torch import nn

from trajscope import trust
from trajscope.io.records import Snapshot
from trajscope.record.describe import _signature

_STOP = object()
# The commit marker advances at most this often (seconds) while records keep coming.
_COMMIT_INTERVAL = 0.25


class WriterSide:
    """The :class:`~trajscope.record.recorder.Recorder`'s writer: queue, commits, the writer loop."""

    def _enqueue(self, snap: Snapshot) -> None:
        if not self.background:
            self._submit("record", snap)
            return
        size = snap.nbytes
        with self._cv:
            if self._inflight and self._inflight + size > self.memory_budget:
                if self.when_behind == "skip":
                    self.n_skipped += 1
                    self._queue.put(("skip", snap.step))
                    self._recycle(snap)
                    return
                while self._inflight and self._inflight + size > self.memory_budget and not self.failed:
                    self._cv.wait(timeout=1.0)
                if self.failed:
                    return
            self._inflight += size
        self._queue.put(("record", snap))

    # ------------------------------------------------------------------ writer
    def _submit(self, kind: str, item: Any) -> None:
        """Hand one item to the writer: the queue of the background thread, or written right here
        on the training thread. There the commit marker advances at once when the last commit is
        _COMMIT_INTERVAL old, else from a timer at the end of the interval (so a pause in training
        never leaves written records invisible)."""
        if self.background:
            self._queue.put((kind, item))
            return
        with self._lock:
            if self.failed or self._closed:
                return
            try:
                self._write(kind, item)
            except Exception as e:
                self._fail(e)  # what was complete before it is still committed below
            if self.failed or time.monotonic() - self._last_commit >= _COMMIT_INTERVAL:
                self._commit_inline()
            elif self._timer is None:
                self._arm_timer()

    def _commit_inline(self) -> None:
        """Commit what the training thread wrote: every record counted by the writer is complete,
        also after a failure (a failed append is never counted)."""
        try:
            self.writer.commit()
        except Exception as e:
            self._fail(e)
        self._last_commit = time.monotonic()

    def _commit_if_due(self, now: float) -> None:
        """At a step taken at ``now``: commit what the training thread wrote once the last commit is
        _COMMIT_INTERVAL old, here on the training thread, between its own parallel ops."""
        if self._timer is not None and now - self._last_commit >= _COMMIT_INTERVAL:
            self._commit_tail()

    def _commit_tail(self, from_timer: bool = False) -> None:
        """Commit records the training thread left uncommitted. While steps keep coming the next
        step's pre-hook does it (a commit on the timer thread preempts one of torch's threads and
        stalls training at the next barrier, like a writer thread would); the timer commits only
        when training pauses."""
        with self._lock:
            if from_timer and (self._closed or self._timer is not threading.current_thread()):
                # close() or the training thread's commit ran while this timer waited for the
                # lock: they committed, and a newer timer (if any) is the one close() will stop
                return
            if from_timer and time.monotonic() - self._last_step_time < _COMMIT_INTERVAL:
                self._arm_timer()
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._closed:
                self._commit_inline()

    def _arm_timer(self) -> None:
        """Start the commit timer (caller holds ``_lock``). Never after close(): a daemon thread
        that wakes while the interpreter shuts down can abort the whole process."""
        if self._closed:
            return
        self._timer = threading.Timer(_COMMIT_INTERVAL, self._commit_tail, (True,))
        self._timer.name = "trajscope-commit-timer"
        self._timer.daemon = True
        self._timer.start()

    def _write(self, kind: str, item: Any) -> None:
        """Write one queued item (uncommitted)."""
        if kind == "record":
            if isinstance(item.loss, torch.Tensor):
                item.loss = float(item.loss)
            self.writer.append(item, commit=False)
            self.n_recorded += 1
            self._recycle(item)
        elif kind == "skip":
            self.writer.skip(item, commit=False)
        elif kind == "probe":
            self.writer.write_probe(item)
        elif kind == "model_meta":
            model = {**self.writer.attrs["model"], **item}
            program = self.writer.extra_path("model.pt2") if model.get("exported") else None
            digest = trust.file_sha256(program) if program is not None else None
            self.writer.set_attrs(model=model, signature=_signature(model, self.writer.attrs.get("loss"), digest))

    def _write_loop(self) -> None:
        # Records become visible when the commit marker advances: right away when the writer was
        # idle, otherwise at most every _COMMIT_INTERVAL seconds (the marker costs a file creation
        # and a rename), at flush() and at close().
        last_commit = -math.inf
        while True:
            try:
                if self.writer.uncommitted and not self._writer_failed:
                    kind, item = self._queue.get(timeout=max(0.0, last_commit + _COMMIT_INTERVAL - time.monotonic()))
                else:
                    kind, item = self._queue.get()
            except queue.Empty:
                try:
                    self.writer.commit()
                except Exception as e:
                    self._fail(e)
                last_commit = time.monotonic()
                continue
            if kind is _STOP:
                try:
                    if not self._writer_failed:
                        self.writer.commit()
                except Exception as e:
                    self._fail(e)
                self.writer.close()
                self._queue.task_done()
                return
            try:
                # After a failure on the writer thread nothing more is written; after one on the
                # training thread, snapshots queued before it are still good and get written.
                if self._writer_failed:
                    continue
                self._write(kind, item)
                if kind == "commit" or time.monotonic() - last_commit >= _COMMIT_INTERVAL:
                    self.writer.commit()  # before task_done(): flush() returns with it on disk
                    last_commit = time.monotonic()
            except Exception as e:
                self._fail(e)
                try:
                    self.writer.commit()  # records complete before the failure stay readable
                except Exception:
                    pass
            finally:
                if kind == "record":
                    with self._cv:
                        self._inflight -= item.nbytes
                        self._cv.notify_all()
                self._queue.task_done()

    # ------------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """Wait until everything queued so far is written and committed (or dropped after a failure)."""
        if self._thread is not None:
            if self._thread.is_alive():
                self._queue.put(("commit", None))
                self._queue.join()
            return
        with self._lock:
            self._commit_inline()


def _free_core_for_writer(model: nn.Module) -> bool:
    """Whether a background writer thread would run without preempting training: the model trains
    on an accelerator (the CPU mostly waits), or the process may use more cores than torch's
    intra-op threads."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()
