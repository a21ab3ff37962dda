"""``TrajscopeCallback``: record a Lightning 2.x ``Trainer.fit`` with one line.

::

    trainer = L.Trainer(callbacks=[TrajscopeCallback("runs/x")])

What it does, hook by hook:

* ``on_train_start`` (the optimizers exist and a checkpoint given to ``fit(ckpt_path=...)`` is
  restored; the Recorder's step is the trainer's ``global_step``): a :class:`trajscope.Recorder` on the LightningModule
  (its own parameter names: Lightning's and DDP's wrappers are not recorded) and the trainer's
  first optimizer. The model spec is ``module:Class`` of the LightningModule with
  ``self.hparams`` as keyword arguments (call ``self.save_hyperparameters()`` in ``__init__``), so
  ``trajscope analyze`` rebuilds it; its ``forward`` is what the analysis replays.
* ``on_train_batch_start``: the batch, split into ``(inputs, targets)``. Lightning calls
  ``optimizer.step(closure)``; the Recorder takes θ_t when the closure first returns, so the batch
  handed over before the closure is that step's. Under ``accumulate_grad_batches=k`` the k batches
  handed over before a step are its micro-batches, joined.
* ``on_before_backward``: the loss of the micro-batch, as the training step computed it (under
  mixed precision: in autocast). Lightning divides it by ``accumulate_grad_batches`` before
  backward (and "16-mixed" multiplies it by the loss scale); the callback undoes both, so the
  step's recorded loss is the mean loss of its joined batch, the loss whose gradient the step used.
  Under "bf16-mixed" that is the autocast loss: the analysis replays the model in full precision,
  and its fidelity check reports the difference (~1e-3 relative for float32 layers run in bf16;
  none for float64 layers, which autocast leaves alone).
* ``on_fit_end``, ``on_exception``, ``teardown``: the recorder is closed (what was recorded stays
  readable when training fails).

Several optimizers (manual optimization): only the first, ``trainer.optimizers[0]``, is recorded,
with one warning naming the others; record them to separate runs with your own Recorders.
Resuming: ``TrajscopeCallback(path, resume=True)`` with ``fit(ckpt_path=...)`` continues the run at
the checkpoint's step.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from trajscope.record.recorder import Recorder

Split = Callable[[Any], "tuple[Any, Any]"]


def split_xy(batch: Any) -> tuple[Any, Any]:
    """The default split: an ``(inputs, targets)`` pair (tuple or list of two)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"TrajscopeCallback: a batch of type {type(batch).__name__}"
        f"{f' with {len(batch)} items' if isinstance(batch, (tuple, list)) else ''} is not an "
        f"(inputs, targets) pair: pass split=lambda batch: (inputs, targets)"
    )


class TrajscopeCallback(pl.Callback):
    """Records ``Trainer.fit`` to ``path`` (a run folder) with a :class:`trajscope.Recorder`.

    Args:
        path: the run folder.
        loss_fn: the loss ``loss_fn(module(inputs), targets)``; default: the module's ``loss_fn``
            or ``criterion`` attribute. Without one the run records, but ``analyze`` needs ``--loss``.
        split: ``split(batch) -> (inputs, targets)``; default :func:`split_xy`.
        model_spec, model_kwargs: override the import spec derived from the LightningModule.
        **recorder_kwargs: passed to :class:`trajscope.Recorder` (``every``, ``window``,
            ``overwrite``, ``resume``, ``probe``, ...).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        loss_fn: Any = None,
        split: Split | None = None,
        model_spec: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        **recorder_kwargs: Any,
    ) -> None:
        self.path = Path(path)
        self.loss_fn, self.split = loss_fn, split or split_xy
        self.model_spec, self.model_kwargs = model_spec, model_kwargs
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Recorder | None = None
        self._normalize = 1

    # ------------------------------------------------------------------ lifecycle
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            warnings.warn("TrajscopeCallback: the trainer has no optimizer; nothing is recorded", stacklevel=2)
            return
        if len(trainer.optimizers) > 1:
            others = ", ".join(type(o).__name__ for o in trainer.optimizers[1:])
            warnings.warn(
                f"TrajscopeCallback: {len(trainer.optimizers)} optimizers; only the first "
                f"({type(trainer.optimizers[0]).__name__}) is recorded, not {others}",
                stacklevel=2,
            )
        loss_fn = self.loss_fn if self.loss_fn is not None else _module_loss(pl_module)
        if loss_fn is None:
            warnings.warn(
                "TrajscopeCallback: no loss_fn given and the module has no loss_fn or criterion "
                "attribute: the run records, and `trajscope analyze` will need --loss",
                stacklevel=2,
            )
        spec, kwargs = (self.model_spec, self.model_kwargs) if self.model_spec else _model_spec(pl_module)
        # Lightning divides each micro-batch's loss by accumulate_grad_batches under automatic optimization
        self._normalize = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        kw = {"export": False if spec else None, **self.recorder_kwargs}
        if trainer.global_step and "step" not in kw:
            # fit(ckpt_path=...): steps go on from the checkpoint's (with resume=True, records from it
            # on are a restart). Manual optimization with several optimizers counts all their steps:
            # pass step= then.
            kw["step"] = trainer.global_step
        self.recorder = Recorder(
            self.path, pl_module, trainer.optimizers[0], loss_fn, model_spec=spec, model_kwargs=kwargs, **kw
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def _close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        rec = self.recorder
        if rec is None or rec.failed:
            return
        try:
            inputs, targets = self.split(batch)
        except Exception as e:  # a usage error, found at the first batch: warn and stop, never break fit
            rec._fail(e)
            return
        rec.batch(inputs, targets)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.recorder is None:
            return
        loss = loss.detach() * self._normalize
        # "16-mixed" hands this hook the loss already multiplied by GradScaler's scale (a power of 2:
        # dividing it back is exact)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            loss = loss / scaler.get_scale()
        self.recorder.loss(loss)


def _module_loss(module: nn.Module) -> Any:
    for name in ("loss_fn", "criterion"):
        fn = getattr(module, name, None)
        if fn is not None and callable(fn):
            return fn
    return None


def _model_spec(module: pl.LightningModule) -> tuple[str | None, dict[str, Any] | None]:
    """``module:Class`` and ``self.hparams`` of the LightningModule, when they rebuild it offline;
    otherwise (None, None) and a warning saying why (the Recorder then exports the model)."""
    cls = type(module)
    kwargs = dict(module.hparams)
    why = None
    if cls.__module__ == "__main__" or "<" in cls.__qualname__:
        why = f"{cls.__qualname__} is defined in a script or a function, not importable"
    else:
        try:
            kwargs = json.loads(json.dumps(kwargs))
        except (TypeError, ValueError):
            why = "its hparams are not JSON (numbers, strings, lists, dicts)"
        else:
            params = inspect.signature(cls.__init__).parameters.values()
            missing = [
                p.name
                for p in params
                if p.name != "self"
                and p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name not in kwargs
            ]
            if missing:
                why = (
                    f"__init__ needs {', '.join(missing)}, which self.hparams lacks (call self.save_hyperparameters())"
                )
    if why is not None:
        warnings.warn(
            f"TrajscopeCallback: no import spec for the model ({why}); pass model_spec= or analyse with --model",
            stacklevel=3,
        )
        return None, None
    return f"{cls.__module__}:{cls.__qualname__}", kwargs


__all__ = ["TrajscopeCallback", "split_xy"]
