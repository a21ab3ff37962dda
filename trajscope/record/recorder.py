"""``trajscope.Recorder``: record a training trajectory from any PyTorch loop (SPEC §2).

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
"""
from __future__ import annotations

import atexit
import copy
import errno
import logging
import math
import os
import queue
import shutil
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

import trajscope
from trajscope import capture, trust
from trajscope.errors import TrajscopeError
from trajscope.modelloss import ModelLoss, for_model
from trajscope.io.layout import STORE_NAME, is_run, shard_store_name
from trajscope.io.packing import flatten_batch, make_layout, numeric_hparams, pack, unflatten_batch
from trajscope.io.records import ForwardState, Snapshot
from trajscope.io.writer import TrajectoryWriter

log = logging.getLogger("trajscope")
_STOP = object()
# The commit marker advances at most this often (seconds) while records keep coming.
_COMMIT_INTERVAL = 0.25


class Recorder:
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

    def __init__(self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Any = None, *,
                 every: int = 1, window: int | None = None, model_spec: str | None = None,
                 model_kwargs: Mapping[str, Any] | None = None, export: bool | None = None, probe: Any = None,
                 background: bool | None = None, memory_budget: int = 512 * 2**20, when_behind: str = "wait",
                 resume: bool = False,
                 step: int | None = None, overwrite: bool = False, distributed: bool | None = None,
                 loss: Any = None) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        if when_behind not in ("wait", "skip"):
            raise ValueError("when_behind must be 'wait' or 'skip'")
        self.path = Path(path)
        # torch.compile / DDP wrappers prefix every name (_orig_mod., module.): record the bare model's
        # names, which are what the replayed model has.
        root = model      # the module the loop calls: its forward pre-hook sees every forward pass
        model, self._wrappers = capture.unwrap_model(model)
        loss_fn = _model_loss(model, loss_fn, loss)
        if model_spec is None and isinstance(loss_fn, ModelLoss):
            model_spec, model_kwargs = capture.model_spec_of(model) or (None, model_kwargs)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.rank, self.world_size = _process_group(distributed)
        # ranks > 0 write their batch shard and loss only, to their own store
        self._store = shard_store_name(self.rank) if self.rank else STORE_NAME
        if self.rank:
            export = False
        self.every = int(every)
        self.window = int(window if window is not None else (1 if every == 1 else 2))
        # By default the exported program is the fallback for runs without an import spec (README): it
        # costs the training thread ~80 ms for a small MLP, far more for large models.
        self.export = bool(export) if export is not None else model_spec is None
        self.memory_budget = int(memory_budget)
        self.when_behind = when_behind
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
        self._lock = threading.Lock()                  # training-thread writes vs. the commit timer
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
        # Everything that touches the file system happens here, before any thread, timer, hook or
        # atexit handler exists: an OSError then leaves nothing behind to undo but files (see the
        # class docstring, "Raises").
        made = _missing_folders(self.path)
        fresh = False
        try:
            if is_run(self.path, self._store) and not (resume or overwrite):
                raise TrajscopeError(f"{self.path} already holds a recorded run{f' (rank {self.rank})' if self.rank else ''}: "
                                     f"pass resume=True to continue it or overwrite=True to replace it")
            self._names = self._param_names()
            self._param_items = list(model.named_parameters())
            self._buffer_items = [(n, b) for n, b in model.named_buffers() if b is not None]
            self._param_layout = make_layout(self._param_items)
            self._buffer_layout = make_layout(self._buffer_items)
            self._hparam_names, self._hparam_bools = self._hparam_schema()
            self._n_groups = len(optimizer.param_groups)
            meta = self._meta(model_spec, model_kwargs)
            meta["signature"] = _signature(meta["model"], meta["loss"], None)
            if self.world_size > 1:
                meta = _distributed_meta(meta, self.rank, self.world_size)

            writer_resume = bool(resume and is_run(self.path, self._store))
            self.writer = TrajectoryWriter(self.path, None if writer_resume else meta, resume=writer_resume,
                                           name=self._store)
            fresh = not writer_resume
            if writer_resume:
                # Check before truncating: a refused resume must not lose recorded steps.
                self._check_resumable(self.writer.attrs, meta)
                _check_writable(self.writer.path)   # nothing else writes before the first record
                if step is not None:
                    self.writer._truncate_from(int(step))
            if probe is not None and not self.rank:     # rank 0 stores the probe for the run
                # Written here, on the constructing thread, so that a full disk fails the constructor.
                try:
                    self.writer.write_probe(_detached_copy(probe))
                except Exception as e:
                    if isinstance(e, OSError):
                        raise
                    self._fail(e)        # a probe the store cannot hold: as for any record, warn and stop
        except OSError as e:
            self._abandon_construction(made, fresh)
            raise TrajscopeError(_cannot_record(self.path, e)) from e
        last = self.writer.last_step
        self._step = int(step) if step is not None else (last + 1 if last is not None else 0)
        self.start_step = self._step

        self.background = _free_core_for_writer(model) if background is None else bool(background)
        if self.background:
            self._thread = threading.Thread(target=self._write_loop, name="trajscope-writer", daemon=True)
            self._thread.start()
        self._hooks.append(optimizer.register_step_pre_hook(self._pre_step))
        if isinstance(loss_fn, nn.Module):
            self._hooks.append(loss_fn.register_forward_hook(self._on_loss))
        if isinstance(loss_fn, ModelLoss):
            self._hooks.append(model.register_forward_hook(self._on_model_loss))
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
        for folder in made:          # deepest first; a folder someone else filled meanwhile stays
            try:
                folder.rmdir()
            except OSError:
                pass

    # ------------------------------------------------------------------ description of the run
    def _param_names(self) -> dict[int, str]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        for g, group in enumerate(self.optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                names.setdefault(id(p), f"optimizer.group{g}.param{i}")
        return names

    def _hparam_schema(self) -> tuple[list[str], list[str]]:
        names: list[str] = []
        bools: list[str] = []
        for group in self.optimizer.param_groups:
            for k, v in numeric_hparams(group).items():
                if k not in names:
                    names.append(k)
            bools += [k for k, v in group.items() if isinstance(v, bool) and k not in bools]
        return names, bools

    def _meta(self, model_spec: str | None, model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        opt = self.optimizer
        groups = [{"params": [self._names[id(p)] for p in g["params"]],
                   "static": {k: v for k, v in g.items() if k != "params" and not isinstance(v, (int, float, bool, tuple, list))}}
                  for g in opt.param_groups]
        return {
            "trajscope_version": trajscope.__version__,
            "torch_version": torch.__version__,
            "cadence": {"every": self.every, "window": self.window},
            "params": [s.to_json() for s in self._param_layout],
            "trainable": [n for n, p in self._param_items if p.requires_grad],
            "buffers": [s.to_json() for s in self._buffer_layout],
            "optimizer": {"class": f"{type(opt).__module__}.{type(opt).__qualname__}", "name": type(opt).__name__,
                          "groups": groups},
            "hparam_names": self._hparam_names,
            "hparam_bools": self._hparam_bools,
            "model": {"class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                      "spec": model_spec, "kwargs": dict(model_kwargs or {}), "exported": None,
                      "export_error": None if self.export else "export not requested",
                      "node_layers": capture.describe_node_layers(self.model), "wrapped_by": self._wrappers,
                      "mode_sensitive": capture.mode_sensitive(self.model)},
            "loss": capture.describe_loss(self.loss_fn) if self.loss_fn is not None else None,
        }

    def _check_resumable(self, attrs: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        stored = [tuple(s[:3]) for s in attrs["params"]]
        now = [tuple(s[:3]) for s in meta["params"]]
        if stored != now:
            diff = next((a for a, b in zip(now, stored) if a != b), None) or "parameter count"
            raise TrajscopeError(f"cannot resume {self.path}: the model's parameters differ from the recorded ones "
                                 f"(first difference: {diff}); record to a new folder")
        # the hparams columns and groups are described once, in the root attributes
        was, now = attrs["optimizer"], meta["optimizer"]
        if (was["class"], len(was["groups"]), attrs["hparam_names"]) != \
                (now["class"], len(now["groups"]), meta["hparam_names"]):
            raise TrajscopeError(f"cannot resume {self.path}: the optimizer differs from the recorded one (recorded "
                                 f"{was['name']} with {len(was['groups'])} group(s) and hyperparameters "
                                 f"{attrs['hparam_names']}, now {now['name']} with {len(now['groups'])} and "
                                 f"{meta['hparam_names']}); record to a new folder")

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
            if loss is not None:   # detached: holding the graph until the step would keep its memory
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
        path = tmp = None
        try:
            # memo: a loss module inside the model carries this recorder's forward hook, not to be copied
            twin = copy.deepcopy(self.model, {id(self): self}).to("cpu").eval()
            path = self.writer.extra_path("model.pt2")
            # Write aside and rename: a kill mid-save (or a resumed run re-exporting) never leaves a
            # truncated program where the attributes point. torch.export.save wants a .pt2 suffix.
            tmp = path.with_name(path.stem + ".partial.pt2")
            capture.export_model(twin, _detached_copy(inputs), str(tmp))
            os.replace(tmp, path)
            update = {"exported": "extra/model.pt2", "export_error": None}
        except Exception as e:  # export is best effort: replay can use the import spec
            update = {"exported": None, "export_error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            log.info("trajscope: torch.export failed (%s); replay will need model_spec or --model", e)
            if tmp is not None:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
        self._submit("model_meta", update)   # the writer owns the store's attributes

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook on the module the loop calls: the train/eval flags and the RNG state this
        forward pass starts from (its dropout masks are drawn from it), paired in order with the
        step's batch() calls (see :meth:`batch`). A pass without gradients (a metric or validation pass
        in between) made no gradient and is not kept. ~55 us per forward pass of a recorded step for an
        81-module model on a busy 2-core machine (each module's flag, and a 5 KiB copy of the CPU
        generator's state); nothing on steps that are not recorded. A failure here only loses the
        forward state (those steps replay in eval mode, said at analysis), never the recording."""
        if self.failed or self._closed or self._ignore_batches or not self.records(self._step) \
                or not torch.is_grad_enabled():
            return
        try:
            if self._modules is None:
                self._modules = list(self.model.named_modules())[1:]
            training = self.model.training
            differ = tuple(n for n, m in self._modules if m.training != training)
            first = next(self.model.parameters(), None)
            dev = first.device if first is not None and first.device.type == "cuda" else None
            cuda = torch.cuda.get_rng_state(dev) if dev is not None else None
            state = (training, differ, torch.get_rng_state(), cuda,
                     None if dev is None else (dev.index if dev.index is not None else torch.cuda.current_device()))
            if self._awaiting_forward and self._batch_step == self._step:
                self._micro_forward[self._awaiting_forward.pop(0)] = state
            elif len(self._unpaired_forwards) < _MAX_UNPAIRED_FORWARDS:
                self._unpaired_forwards.append(state)
        except Exception as e:  # never break training, nor stop the recording for this
            if not self._warned_forward:
                self._warned_forward = True
                warnings.warn(f"trajscope: the forward pass's train flags and RNG state cannot be recorded "
                              f"({type(e).__name__}: {e}); those steps will be replayed in eval mode", RuntimeWarning)

    def _forward_states(self, micro: list, leaves: list) -> list[ForwardState]:
        """The forward state of each micro-batch the record holds (all of them when they were joined,
        the last one when they could not be); none unless each of those had a forward pass."""
        parts = list(zip(micro, self._micro_forward))
        if len(micro) > 1 and leaves is micro[-1][1]:     # not joinable: the record holds the last one only
            parts = parts[-1:]
        if not parts or len(self._micro_forward) != len(micro) or any(f is None for _, f in parts):
            return []
        return [ForwardState(size=_batch_size(m[1]), training=f[0], differ=f[1], rng_cpu=f[2], rng_cuda=f[3],
                             cuda_device=f[4]) for m, f in parts]

    def _on_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.numel() == 1 and not self._ignore_batches:
            self._hook_losses.append(output.detach())
            del self._hook_losses[:-64]    # a loss module also used for metrics must not grow this

    def _on_model_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled():   # a training forward, not an evaluation
            self._on_loss(module, args, getattr(output, "loss", None))

    def _arm_step_hooks(self) -> None:
        """Hooks that watch a step while it runs (the forward pass's state, backward's gradient norms)
        are installed only while the coming step is recorded: on the others their calls into Python
        (one per forward pass, one per parameter in backward) would cost ~0.1 ms a step for nothing."""
        want = not (self.failed or self._closed) and self.records(self._step)
        if want and not self._step_hooks:
            self._step_hooks = [_ForwardHookEntry(self._root, self), *self._gradient_hooks()]
        elif not want:
            for h in self._step_hooks:
                h.remove()
            self._step_hooks = []

    def _gradient_hooks(self) -> list[Any]:
        """Watch the gradient backward accumulates into every parameter the optimizer steps (see
        :meth:`_on_grad`): its norm before the loop unscales or clips it. Not under torch.distributed
        with several ranks: there backward's gradient is the rank's own, before the all-reduce averages
        it into the one the step uses (its norm is recorded NaN)."""
        if _distributed():
            return []
        return [p.register_post_accumulate_grad_hook(self._on_grad) for group in self.optimizer.param_groups
                for p in group["params"] if p.requires_grad and p.is_leaf]

    def _on_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: keep ‖p.grad‖ as backward left it, as a tensor on p's device
        (no device sync inside backward; the writer converts it). The latest call of a step wins, so
        under gradient accumulation it is the norm of the accumulated gradient. Recorded steps only."""
        if self.failed or self._closed or self._ignore_batches or not self.records(self._step) or p.grad is None:
            return
        try:
            self._backward_norms[id(p)] = _grad_norm([p.grad])
        except Exception:   # an odd gradient (e.g. sparse layouts): this step's norm is unknown, training goes on
            self._backward_norms[id(p)] = torch.tensor(math.nan)

    def _step_grad_norms(self) -> tuple[Any, Any]:
        """(‖g‖ the optimizer steps with now, ‖g‖ as backward produced it) over the parameters that have
        a gradient, as 0-d tensors (NaN where unknown: a gradient that backward did not write)."""
        with_grad = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        try:
            stepped = _grad_norm([p.grad for p in with_grad])
        except Exception:
            stepped = math.nan
        if not with_grad or any(id(p) not in self._backward_norms for p in with_grad):
            return stepped, math.nan
        try:
            norms = [self._backward_norms[id(p)] for p in with_grad]
            backward = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
        except Exception:
            backward = math.nan
        return stepped, backward

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        # optimizer.step(closure) (Lightning, LBFGS): the batch and the gradient of this step are made
        # inside the closure, after this hook; the step is taken when the closure first returns.
        found = _closure_of(args, kwargs)
        if found is not None:
            return self._defer_to_closure(*found, args, kwargs)
        self._take_step()
        return None

    def _defer_to_closure(self, closure: Any, where: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
        done = False

        def recorded_closure(*a: Any, **k: Any) -> Any:
            nonlocal done
            if done:   # LBFGS re-evaluates at trial points: not a new step, and its batch is this step's
                self._ignore_batches = True
                try:
                    return closure(*a, **k)
                finally:
                    self._ignore_batches = False
            out = closure(*a, **k)
            done = True   # θ_t is still in place: optimizers update after the closure's first return
            self._take_step()
            return out

        args, kwargs = tuple(args), dict(kwargs)
        if where == "kwargs":
            kwargs["closure"] = recorded_closure
        else:
            args = (args[0], recorded_closure, *args[2:])
        return args, kwargs

    def _take_step(self) -> None:
        step = self._step
        self._step += 1
        self._last_step_time = now = time.monotonic()
        if self._timer is not None and now - self._last_commit >= _COMMIT_INTERVAL:
            self._commit_tail()     # on the training thread, between its own parallel ops
        try:
            if self.failed or self._closed or not self.records(step):
                self._hook_losses.clear()     # loss values of an unrecorded step belong to no record
                self._backward_norms.clear()
                return
            try:
                snap = self._snapshot(step)
                self._enqueue(snap)
            except Exception as e:
                self._fail(e)
        finally:
            self._arm_step_hooks()      # for the coming step

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        free = self._pool.get((tuple(shape), dtype))
        if free:
            try:
                return free.pop()
            except IndexError:  # taken by a concurrent pop
                pass
        return torch.empty(shape, dtype=dtype)

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        """A private CPU copy of ``t`` (detached), in a reused buffer when one is free."""
        return self._alloc(tuple(t.shape), t.dtype).copy_(t.detach())

    def _recycle(self, snap: Snapshot) -> None:
        """Hand the snapshot's buffers back for reuse (its record is written or dropped)."""
        for t in (*snap.params.values(), *snap.buffers.values(), *snap.state.values(), *(t for _, t in snap.batch)):
            free = self._pool.setdefault((tuple(t.shape), t.dtype), [])
            if len(free) < 4:
                free.append(t)

    def _snapshot(self, step: int) -> Snapshot:
        if len(self.optimizer.param_groups) != self._n_groups:  # the store describes the groups once
            raise TrajscopeError("the optimizer's parameter groups changed during the run (add_param_group): "
                                 "recording stops here; record the rest to a new folder")
        full = not self.rank      # a rank > 0 records its batch shard and loss only
        params = pack(self._param_layout, [p for _, p in self._param_items], self._alloc) if full else {}
        buffers = pack(self._buffer_layout, [b for _, b in self._buffer_items], self._alloc) if self._buffer_items and full else {}
        state_items: list[tuple[str, torch.Tensor]] = []
        for group in self.optimizer.param_groups if full else ():
            for p in group["params"]:
                for key, v in self.optimizer.state.get(p, {}).items():
                    if not isinstance(v, torch.Tensor):
                        if not isinstance(v, (int, float, bool)):
                            continue
                        v = torch.tensor(float(v), dtype=torch.float64)
                    state_items.append((f"{self._names[id(p)]}/{key}", v))
        layout = make_layout(state_items) if state_items else None
        state = pack(layout, [t for _, t in state_items], self._alloc) if layout else {}
        hp = np.full((len(self.optimizer.param_groups), len(self._hparam_names)), np.nan)
        for g, group in enumerate(self.optimizer.param_groups):
            for k, v in numeric_hparams(group).items():
                if k in self._hparam_names:
                    hp[g, self._hparam_names.index(k)] = v
        micro = self._micro if self._batch_step == step else []
        spec, leaves = self._join(micro) if micro else (None, [])
        forward = self._forward_states(micro, leaves) if micro else []
        loss = self._step_loss(micro, self._explicit_losses if self._batch_step == step else [])
        grad_norms = self._step_grad_norms()
        self._micro, self._hook_losses, self._explicit_losses = [], [], []
        self._micro_forward, self._unpaired_forwards, self._awaiting_forward = [], [], []
        self._backward_norms.clear()
        return Snapshot(step=step, loss=loss if loss is not None else math.nan, params=params, buffers=buffers,
                        hparams=hp if full else None, state_layout=layout, state=state, batch_spec=spec, batch=leaves,
                        forward=forward, grad_norms=grad_norms)

    def _join(self, micro: list[tuple[Any, list[tuple[str, torch.Tensor]]]]) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
        """The step's batch: its micro-batches (gradient accumulation) joined along the batch axis."""
        if len(micro) == 1:
            return micro[0]
        spec, first = micro[0]
        joinable = all(s == spec and [k for k, _ in ls] == [k for k, _ in first] for s, ls in micro) and all(
            t.dim() >= 1 and t.shape[1:] == micro[0][1][i][1].shape[1:] and t.dtype == micro[0][1][i][1].dtype
            for _, ls in micro for i, (_, t) in enumerate(ls))
        if not joinable:
            if not self._warned_join:
                self._warned_join = True
                warnings.warn("trajscope: the micro-batches of a step differ in structure or trailing shape and "
                              "cannot be joined: such steps record only their last micro-batch", stacklevel=3)
            return micro[-1]
        leaves = [(k, torch.cat([ls[i][1] for _, ls in micro])) for i, (k, _) in enumerate(first)]
        return spec, leaves

    def _step_loss(self, micro: list, explicit: list) -> float:
        """The loss of the step's whole batch from the micro-batch losses: their sum under a summing
        loss, else their mean weighted by micro-batch size (the mean over the joined batch). No
        micro-batch (no batch() this step) counts as one: the loss seen is the step's."""
        k = max(1, len(micro))
        values = explicit if len(explicit) == k else self._hook_losses if len(self._hook_losses) == k else None
        if values is None:  # not one loss per micro-batch: the last one seen, as without accumulation
            last = explicit[-1] if explicit else self._hook_losses[-1] if self._hook_losses else None
            return float(last) if last is not None else math.nan
        vals = [float(v) for v in values]
        if k == 1:
            return vals[0]
        if getattr(self.loss_fn, "reduction", "mean") == "sum":
            return sum(vals)
        sizes = [self._micro_weight(m) for m in micro]
        if sum(sizes) == 0:   # nothing counted (every label ignored): the plain mean
            return sum(vals) / k
        return sum(v * n for v, n in zip(vals, sizes)) / sum(sizes)

    def _micro_weight(self, micro: tuple[Any, list[tuple[str, torch.Tensor]]]) -> int:
        """A micro-batch's weight in the step's mean loss: its samples, or the terms a model loss counts."""
        if isinstance(self.loss_fn, ModelLoss):
            return self.loss_fn.count(unflatten_batch(micro[0], dict(micro[1]))[1])
        return _batch_size(micro[1])

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
                self._fail(e)           # what was complete before it is still committed below
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
                    self.writer.commit()        # before task_done(): flush() returns with it on disk
                    last_commit = time.monotonic()
            except Exception as e:
                self._fail(e)
                try:
                    self.writer.commit()        # records complete before the failure stay readable
                except Exception:
                    pass
            finally:
                if kind == "record":
                    with self._cv:
                        self._inflight -= item.nbytes
                        self._cv.notify_all()
                self._queue.task_done()

    def _fail(self, e: BaseException) -> None:
        if self.failed:
            return
        self.failed = f"{type(e).__name__}: {e}"
        self._writer_failed = threading.current_thread() is getattr(self, "_thread", None)
        last = self.writer.last_step if hasattr(self, "writer") else None
        warnings.warn(f"trajscope: recording stopped ({self.failed}). Training continues; the steps committed so far "
                      f"(last: {last}) stay readable in {self.path}.", RuntimeWarning, stacklevel=2)
        with self._cv:
            self._cv.notify_all()

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

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _process_group(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size) of the default process group when recording is distributed, else (0, 1).
    Local queries only: no collective."""
    if distributed is False:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    if distributed:
        raise ValueError("distributed=True needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group)")
    return 0, 1


def _distributed_meta(meta: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The root attributes of rank ``rank``'s store: rank 0's name the shards to join; a shard store
    describes no parameters, buffers or state (rank 0 records them, identical on every rank)."""
    if not rank:
        return {**meta, "distributed": {"world_size": world_size,
                                        "shards": [shard_store_name(k) for k in range(1, world_size)]}}
    return {**meta, "params": [], "buffers": [], "trainable": [], "signature": None,
            "shard": {"rank": rank, "world_size": world_size, "of": STORE_NAME}}


#: training forward passes of one step kept for pairing with its batch() calls (more: a loop that runs
#: the model with gradients for something else; the surplus is not kept)
_MAX_UNPAIRED_FORWARDS = 64

# Recorders by the id of the module whose forward passes they watch (several may watch one model). The
# hook is a module-level function that finds its recorders here, not a bound method: a deep copy of the
# model (the export twin, a user's EMA copy) or torch.save of the whole module would otherwise try to copy
# or pickle the Recorder itself. It is registered once per module, while some recorder watches it.
_FORWARD_WATCHERS: dict[int, list["weakref.ref[Recorder]"]] = {}
_FORWARD_HANDLES: dict[int, Any] = {}


def _forward_pre_hook(module: nn.Module, args: Any) -> None:
    for ref in list(_FORWARD_WATCHERS.get(id(module), ())):
        rec = ref()
        if rec is not None and rec.model is not None:
            rec._on_forward(module, args)


class _ForwardHookEntry:
    """Registers a recorder for :func:`_forward_pre_hook`; ``remove()`` (as a hook handle) unregisters it."""

    def __init__(self, module: nn.Module, rec: "Recorder") -> None:
        self.key = id(module)
        self.ref = weakref.ref(rec)
        if self.key not in _FORWARD_WATCHERS:
            _FORWARD_HANDLES[self.key] = module.register_forward_pre_hook(_forward_pre_hook)
        _FORWARD_WATCHERS.setdefault(self.key, []).append(self.ref)

    def remove(self) -> None:
        watchers = _FORWARD_WATCHERS.get(self.key, [])
        if self.ref in watchers:
            watchers.remove(self.ref)
        if not watchers and self.key in _FORWARD_WATCHERS:
            del _FORWARD_WATCHERS[self.key]
            _FORWARD_HANDLES.pop(self.key).remove()


def _closure_of(args: Any, kwargs: Any) -> tuple[Any, str] | None:
    """The closure passed to ``optimizer.step`` and where it was passed, if any."""
    if kwargs and callable(kwargs.get("closure")):
        return kwargs["closure"], "kwargs"
    if len(args) > 1 and callable(args[1]):   # args[0] is the optimizer itself
        return args[1], "args"
    return None


def _model_loss(model: nn.Module, loss_fn: Any, loss: Any) -> Any:
    """The loss to record: ``loss_fn``, or its ``loss=`` spelling; ``"model"`` becomes the model's ModelLoss."""
    if loss is not None:
        if loss_fn is not None:
            raise ValueError("give the loss once: loss_fn or loss")
        loss_fn = loss
    if isinstance(loss_fn, str):
        if loss_fn != "model":
            raise ValueError(f"loss {loss_fn!r}: the only loss named by a string is 'model' (the model computes it)")
        return for_model(model)
    return loss_fn


def _grad_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of ``tensors`` taken together, a 0-d tensor (float32 at least, on the first one's
    device), computed without a device sync. One tensor (the per-parameter hook) skips the grouping
    by device and dtype, which costs more than the norm itself on small models."""
    dense = [(t.coalesce().values() if t.is_sparse else t).detach() for t in tensors]
    dense = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in dense]
    if len(dense) == 1:
        return torch.linalg.vector_norm(dense[0])
    return torch.nn.utils.get_total_norm(dense, error_if_nonfinite=False)


def _distributed() -> bool:
    """Whether this process is one of several torch.distributed ranks."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _batch_size(leaves: list[tuple[str, torch.Tensor]]) -> int:
    """Samples in a micro-batch: the leading size of its first leaf (inputs come first)."""
    return int(leaves[0][1].shape[0]) if leaves and leaves[0][1].dim() else 1


def _signature(model: Mapping[str, Any], loss: Any, exported_sha256: str | None) -> dict[str, Any] | None:
    """This user's signature over the run's description of its code (:mod:`trajscope.trust`): runs
    recorded here replay without ``--trust``. Best effort: an unsigned run only asks for a flag."""
    try:
        return trust.sign(model, loss, exported_sha256)
    except Exception as e:
        log.info("trajscope: the run is not signed (%s); analysing it will need --trust or --model", e)
        return None


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its ancestors that do not exist yet, deepest first."""
    out = []
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        out.append(p)
    return out


def _check_writable(folder: Path) -> None:
    """Raise the OSError that the first record would meet in ``folder`` (read-only, permission denied,
    full). A ``*.partial`` name: a process killed in between leaves what a resume removes."""
    probe = folder / f".write-check.{uuid.uuid4().hex}.partial"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


_ADVICE = {
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "choose a folder you may write to, or change its permissions",
    errno.EPERM: "choose a folder you may write to, or change its permissions",
    errno.ENOSPC: "free some space or choose a folder on another disk",
    errno.EDQUOT: "free some space (disk quota exceeded) or choose a folder on another disk",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "check the symbolic links on the path",
    errno.EMFILE: "close files or raise the limit of open files (ulimit -n)",
    errno.ENFILE: "close files or raise the limit of open files",
}


def _cannot_record(path: Path, e: OSError) -> str:
    """One line for a construction that failed on the file system: the run, the reason, what to do."""
    where = str(path)
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        file = next((p for p in (path, *path.parents) if os.path.exists(p) and not os.path.isdir(p)), None)
        if file is not None:
            return f"cannot record to {where}: {file} is a file, not a folder; choose another path"
    if e.errno is not None:
        reason = f"{os.strerror(e.errno).lower()} (errno {e.errno})"
    else:
        reason = f"{type(e).__name__}: {e}"
    advice = _ADVICE.get(e.errno, "check the folder and its disk, or choose another folder")
    return f"cannot record to {where}: {reason}; {advice}".replace("\r", " ").replace("\n", " ")


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


def _detached_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, tuple):
        return tuple(_detached_copy(o) for o in obj)
    if isinstance(obj, list):
        return [_detached_copy(o) for o in obj]
    if isinstance(obj, Mapping):
        return {k: _detached_copy(v) for k, v in obj.items()}
    return obj


__all__ = ["Recorder"]
