"""``trajscope.Recorder``: record a training trajectory from any PyTorch loop (docs/spec.md §2).

The contract loop::

    with trajscope.Recorder("runs/exp1", model, opt, loss_fn, every=1) as rec:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()

θ_t is taken in an optimizer *step pre-hook*, i.e. immediately before the update, so the batch,
the gradient, the optimizer state and the parameters of a record belong together. The training
thread makes private copies (one ``torch.cat`` per dtype); a background thread writes them, or,
when no CPU core is free for such a thread, the training thread writes them itself (see
``background``). Any failure inside the recorder warns once, stops recording and leaves the
committed part of the store readable; it never raises into the training loop. A Recorder that
cannot write its run at all raises one TrajscopeError at construction, before anything is trained.

This module holds the public class, its construction and its training-thread entry points; the
Recorder's other parts are mixins and helpers beside it: :mod:`~trajscope.record.config` (the options),
:mod:`~trajscope.record.describe` (the run's attributes), :mod:`~trajscope.record.hooks` (watching a
step), :mod:`~trajscope.record.snapshot` (the step's copy), :mod:`~trajscope.record.writer_thread`
(writing and commits), :mod:`~trajscope.record.export`, :mod:`~trajscope.record.distributed` and
:mod:`~trajscope.record.construction` (the file system at construction).

Longer than 400 lines because the public class keeps its whole user-facing surface here (its
documented arguments, the loop methods and their failure policy); the parts behind it are the
modules named above.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import queue
import shutil
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trajscope.errors import TrajscopeError
from trajscope.io.layout import is_run
from trajscope.io.packing import flatten_batch
from trajscope.io.writer import TrajectoryWriter
from trajscope.modelloss import ModelLoss
from trajscope.record import export as _export
from trajscope.record.config import RecorderConfig, configure
from trajscope.record.construction import _cannot_record, _check_writable, _missing_folders
from trajscope.record.describe import RunDescription
from trajscope.record.hooks import StepHooks
from trajscope.record.snapshot import Snapshots, _detached_copy
from trajscope.record.writer_thread import _STOP, WriterSide, _free_core_for_writer  # noqa: F401 (benchmarks use it here)

log = logging.getLogger("trajscope")


class Recorder(RunDescription, StepHooks, Snapshots, WriterSide):
    """Records parameters, batches, losses, hyperparameters and optimizer state to ``RUN/trajectory.zarr``.

    Args:
        path: the run folder (created).
        model, optimizer: the module being trained and its ``torch.optim`` optimizer.
        loss_fn: the loss; a ``torch.nn`` loss module is recorded by class and arguments (and its
            value is captured through a forward hook), a function by import path. ``"model"``
            (also as ``loss="model"``): the loss the model computes itself from ``labels``
            (Hugging Face ``outputs.loss``, captured through a forward hook on the model), replayed
            as :class:`trajscope.modelloss.ModelLoss`; then ``rec.batch(batch)`` takes the dict the
            model was called with and records it as ``(inputs without "labels", labels)``, and a
            ``transformers`` model needs no ``model_spec``: its config is recorded
            (:func:`trajscope.integrations.huggingface.from_config`).
        every, window: record steps ``t`` with ``t % every < window``. The default window is 1 when
            ``every == 1`` and 2 otherwise, so θ_{t+1} is on disk for every analysed θ_t.
        model_spec, model_kwargs: ``"package.module:factory"`` and JSON-able keyword arguments that
            rebuild the model offline (preferred: no code is unpickled at analysis time).
        export: also save a ``torch.export`` program (dynamic batch) of a copy of the model, traced
            with the first recorded batch. Default: only when no ``model_spec`` is given. It runs
            once, on the training thread inside that ``batch()`` call (torch.export flips
            process-global flags that would change a concurrent optimizer step), and costs ~0.1 s
            for a small model plus ~1 s of one-off imports.
        probe: an optional fixed ``(inputs, targets)`` batch stored once, for curvature comparable
            across checkpoints.
        background: write records on a background thread (True) or on the training thread, inside
            the step pre-hook (False; a timer commits what was written within 0.25 s). Default: a background thread
            when the parameters live on an accelerator or the process may use more CPU cores than
            torch's intra-op threads; otherwise the training thread. Where torch's threads already
            keep every core busy, a writer thread preempts them and stalls each parallel op at its
            barrier: on 2 cores a 2.9 MiB record cost training ~6 ms that way, against ~1 ms
            written in place (``benchmarks/bench_recorder.py``).
        memory_budget: bytes of snapshots allowed in flight before ``when_behind`` applies
            (background writer only).
        when_behind: ``"wait"`` (block the step until the writer catches up) or ``"skip"`` (drop
            the step's record and note it in the store as skipped); background writer only.
        resume: continue an existing run after its last committed step (or at ``step``).
        step: the training step of the next ``optimizer.step()``. When it is at or before the last
            recorded step (training restarted from a checkpoint), later records are truncated and
            the restart is noted.
        overwrite: replace an existing run instead of refusing.
        distributed: under an initialised ``torch.distributed`` process group of W > 1 processes
            (DDP), give every rank the same ``path``: rank 0 records everything, the other ranks
            only their batch shard and loss, each in its own store ``trajectory.rank<k>.zarr``
            beside ``trajectory.zarr``. No rank waits for another (no collective: a rank whose
            recorder failed cannot stall the others); the reader joins the shards of a step.
            Default (None): so whenever such a group is initialised; False records each process as
            if it were alone (give each rank its own path then).

    Raises:
        ValueError, TrajscopeError: usage errors (bad arguments; an existing run without ``resume``
            or ``overwrite``; a resume whose model or optimizer differs from the recorded one).
        TrajscopeError: the environment refused the run at construction: any ``OSError`` while
            the store is created or opened (read-only file system, permission denied, disk full,
            the path is a file, a name too long, ...). Its message is one line naming the run, the
            reason and what to do; the ``OSError`` is its ``__cause__``. Nothing half-made is left:
            no temporary store, no new empty folder, no writer thread or commit timer, no hooks on
            the optimizer or the loss, no atexit handler. A resumed run is checked for writing
            too, although nothing else writes to it before the first record.

    Why construction fails while recording later never does: at construction nothing has been
    trained yet, so failing fast loses nothing, whereas training on without the recording the user
    asked for would lose the very run they meant to record. Once training runs, the same failures
    warn once and stop recording (the committed steps stay readable) and training continues.
    """

    def __init__(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any = None,
        *,
        every: int = 1,
        window: int | None = None,
        model_spec: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        export: bool | None = None,
        probe: Any = None,
        background: bool | None = None,
        memory_budget: int = 512 * 2**20,
        when_behind: str = "wait",
        resume: bool = False,
        step: int | None = None,
        overwrite: bool = False,
        distributed: bool | None = None,
        loss: Any = None,
    ) -> None:
        cfg = configure(
            path,
            model,
            loss_fn,
            every=every,
            window=window,
            model_spec=model_spec,
            model_kwargs=model_kwargs,
            export=export,
            probe=probe,
            background=background,
            memory_budget=memory_budget,
            when_behind=when_behind,
            resume=resume,
            step=step,
            overwrite=overwrite,
            distributed=distributed,
            loss=loss,
        )
        self.path = cfg.path
        self.model, self._wrappers, self.optimizer, self.loss_fn = cfg.model, cfg.wrappers, optimizer, cfg.loss_fn
        self.rank, self.world_size, self._store = cfg.rank, cfg.world_size, cfg.store
        self.every, self.window, self.export = cfg.every, cfg.window, cfg.export
        self.memory_budget, self.when_behind = cfg.memory_budget, cfg.when_behind
        self._init_state()
        self._open_store(cfg)
        last = self.writer.last_step
        self._step = int(step) if step is not None else (last + 1 if last is not None else 0)
        self.start_step = self._step
        # root: the module the loop calls (wrappers included): its forward pre-hook sees every forward pass
        self._start(root=model, background=background)

    def _init_state(self) -> None:
        """The recording's state before the first step: counters, the step's collections, the writer's queue."""
        self.n_recorded = 0
        self.n_skipped = 0
        self.failed: str | None = None
        self._writer_failed = False
        self._closed = False
        # The micro-batches given to batch() during the current step (several under gradient
        # accumulation), and the loss values seen since the last step: hooked and explicit.
        self._micro: list[tuple[Any, list[tuple[str, torch.Tensor]]]] = []
        # what each micro-batch's forward pass used (train flags, RNG state); the training forwards of this
        # step not yet paired with a batch() call, and the micro-batches given before their forward pass
        self._micro_forward: list[tuple | None] = []
        self._unpaired_forwards: list[tuple] = []
        self._awaiting_forward: list[int] = []
        self._modules: list[tuple[str, nn.Module]] | None = None
        self._warned_forward = False
        self._batch_step = -1
        self._hook_losses: list[torch.Tensor] = []
        self._explicit_losses: list[torch.Tensor | float] = []
        # id(parameter) -> ‖grad‖ as backward last accumulated it during a recorded step (0-d tensor)
        self._backward_norms: dict[int, torch.Tensor] = {}
        self._warned_join = False
        self._ignore_batches = False
        self._export_queued = not self.export
        self._inflight = 0
        self._cv = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # training-thread writes vs. the commit timer
        self._timer: threading.Timer | None = None
        self._last_commit = -math.inf
        self._last_step_time = -math.inf
        self._hooks: list[Any] = []
        # Snapshot buffers are reused once written: a fresh multi-MB allocation per recorded step
        # costs page faults on the training thread (and unmapping on the writer's), ~1-2 ms per
        # record for a 2.6 MiB model on a busy 2-core machine against ~0.1 ms for a copy into a
        # buffer already in memory. (shape, dtype) -> free CPU tensors.
        self._pool: dict[tuple, list[torch.Tensor]] = {}
        self._thread: threading.Thread | None = None

    def _open_store(self, cfg: RecorderConfig) -> None:
        """Create (or open, to resume) this rank's store and describe the run in it. Everything that
        touches the file system happens here, before any thread, timer, hook or atexit handler exists:
        an OSError then leaves nothing behind to undo but files (see the class docstring, "Raises")."""
        made = _missing_folders(self.path)
        fresh = False
        try:
            if is_run(self.path, self._store) and not (cfg.resume or cfg.overwrite):
                raise TrajscopeError(
                    f"{self.path} already holds a recorded run{f' (rank {self.rank})' if self.rank else ''}: "
                    f"pass resume=True to continue it or overwrite=True to replace it"
                )
            meta = self._describe_run(cfg.model_spec, cfg.model_kwargs)

            writer_resume = bool(cfg.resume and is_run(self.path, self._store))
            self.writer = TrajectoryWriter(
                self.path, None if writer_resume else meta, resume=writer_resume, name=self._store
            )
            fresh = not writer_resume
            if writer_resume:
                # Check before truncating: a refused resume must not lose recorded steps.
                self._check_resumable(self.writer.attrs, meta)
                _check_writable(self.writer.path)  # nothing else writes before the first record
                if cfg.step is not None:
                    self.writer._truncate_from(int(cfg.step))
            if cfg.probe is not None and not self.rank:  # rank 0 stores the probe for the run
                # Written here, on the constructing thread, so that a full disk fails the constructor.
                try:
                    self.writer.write_probe(_detached_copy(cfg.probe))
                except Exception as e:
                    if isinstance(e, OSError):
                        raise
                    self._fail(e)  # a probe the store cannot hold: as for any record, warn and stop
        except OSError as e:
            self._abandon_construction(made, fresh)
            raise TrajscopeError(_cannot_record(self.path, e)) from e

    def _start(self, root: nn.Module, background: bool | None) -> None:
        """Start recording: the writer thread (where one runs), the hooks, the atexit handler."""
        self.background = _free_core_for_writer(self.model) if background is None else bool(background)
        if self.background:
            self._thread = threading.Thread(target=self._write_loop, name="trajscope-writer", daemon=True)
            self._thread.start()
        self._hooks.append(self.optimizer.register_step_pre_hook(self._pre_step))
        if isinstance(self.loss_fn, nn.Module):
            self._hooks.append(self.loss_fn.register_forward_hook(self._on_loss))
        if isinstance(self.loss_fn, ModelLoss):
            self._hooks.append(self.model.register_forward_hook(self._on_model_loss))
        self._root, self._step_hooks = root, []
        self._arm_step_hooks()
        atexit.register(self.close)

    def _abandon_construction(self, made: list[Path], fresh: bool) -> None:
        """Undo what a failed construction wrote: the store it created (never a resumed one), the
        temporary store a failed creation leaves aside, the folders it made. No thread, timer, hook or
        atexit handler exists yet."""
        self._closed = True
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
            if fresh:
                shutil.rmtree(writer.path, ignore_errors=True)
        if os.path.isdir(self.path):
            for tmp in self.path.glob(f".{self._store}.*.partial"):
                shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # deepest first; a folder someone else filled meanwhile stays
            try:
                folder.rmdir()
            except OSError:
                pass

    # ------------------------------------------------------------------ training-thread side
    def records(self, step: int) -> bool:
        """Whether ``step`` is recorded under the cadence."""
        return step % self.every < self.window

    @property
    def step(self) -> int:
        """The training step the next ``optimizer.step()`` performs."""
        return self._step

    def batch(self, inputs: Any, targets: Any = None, *, loss: torch.Tensor | float | None = None) -> None:
        """Give the mini-batch of this step: ``inputs`` as the model takes them (tensor, tuple or
        dict), ``targets`` as the loss takes them. Call between ``backward()`` and ``step()``."""
        if self.failed or self._closed or self._ignore_batches:
            return
        try:
            self._this_step()
            if loss is not None:  # detached: holding the graph until the step would keep its memory
                self._explicit_losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
            if not self.records(self._step):
                return
            if isinstance(self.loss_fn, ModelLoss):
                inputs, targets = self.loss_fn.split(inputs, targets)
            spec, leaves = flatten_batch((inputs, targets))
            self._micro.append((spec, [(k, self._copy(t)) for k, t in leaves]))
            # pair in order: the oldest unpaired forward pass of this step (plain loops: forward, backward,
            # batch; the HF Trainer: k forwards, then k batches); none yet (Lightning hands the batch over
            # before its closure runs the forward): the next forward pass is this micro-batch's
            if self._unpaired_forwards:
                self._micro_forward.append(self._unpaired_forwards.pop(0))
            else:
                self._awaiting_forward.append(len(self._micro_forward))
                self._micro_forward.append(None)
            if not self._export_queued:
                self._export_queued = True
                self._export_now(inputs)
        except Exception as e:  # never break training
            self._fail(e)

    def loss(self, value: torch.Tensor | float) -> None:
        """Give the loss of the micro-batch last given to :meth:`batch`, where it is known only after
        that call (a framework hands the batch over before its training step computes the loss)."""
        if self.failed or self._closed or self._ignore_batches:
            return
        try:
            self._this_step()
            self._explicit_losses.append(value.detach() if isinstance(value, torch.Tensor) else float(value))
        except Exception as e:  # never break training
            self._fail(e)

    def _this_step(self) -> None:
        """Start collecting micro-batches and losses anew at the first one of a step."""
        if self._batch_step != self._step:
            self._micro, self._explicit_losses, self._batch_step = [], [], self._step
            self._micro_forward, self._awaiting_forward = [], []

    def _export_now(self, inputs: Any) -> None:
        """Export a copy of the model on the training thread, before this step's update.

        Not on the writer thread: while ``torch.export`` runs it sets process-global flags
        (``torch.compiler.is_compiling()`` is True), so an optimizer stepping concurrently on the
        training thread takes its compile-time code path (Adam/AdamW then round differently) and
        the recorded trajectory would no longer be the one trained without the recorder.
        """
        update = _export.export_twin(self.model, inputs, self.writer.extra_path, memo={id(self): self})
        self._submit("model_meta", update)  # the writer owns the store's attributes

    def _take_step(self) -> None:
        """The optimizer is about to update θ_t: snapshot the step if it is recorded, then arm the hooks
        for the next one."""
        step = self._step
        self._step += 1
        self._last_step_time = now = time.monotonic()
        self._commit_if_due(now)
        try:
            if self.failed or self._closed or not self.records(step):
                self._hook_losses.clear()  # loss values of an unrecorded step belong to no record
                self._backward_norms.clear()
                return
            try:
                snap = self._snapshot(step)
                self._enqueue(snap)
            except Exception as e:
                self._fail(e)
        finally:
            self._arm_step_hooks()  # for the coming step

    def _fail(self, e: BaseException) -> None:
        if self.failed:
            return
        self.failed = f"{type(e).__name__}: {e}"
        self._writer_failed = threading.current_thread() is getattr(self, "_thread", None)
        last = self.writer.last_step if hasattr(self, "writer") else None
        warnings.warn(
            f"trajscope: recording stopped ({self.failed}). Training continues; the steps committed so far "
            f"(last: {last}) stay readable in {self.path}.",
            RuntimeWarning,
            stacklevel=2,
        )
        with self._cv:
            self._cv.notify_all()

    def close(self, timeout: float | None = 600.0) -> None:
        """Remove the hooks, write what is queued and stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        for h in [*self._hooks, *self._step_hooks]:
            h.remove()
        self._step_hooks = []
        if self._thread is not None:
            self._queue.put((_STOP, None))
            self._thread.join(timeout)
        else:
            with self._lock:
                timer, self._timer = self._timer, None
                if timer is not None:
                    timer.cancel()
                self._commit_inline()
                self.writer.close()
            # Wait for the cancelled timer thread to end: one still waking as the interpreter
            # finalises can take the process down with "Fatal Python error" (SIGABRT).
            if timer is not None and timer is not threading.current_thread():
                timer.join(timeout)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Recorder"]
