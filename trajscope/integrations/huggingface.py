"""Hugging Face ``transformers``: rebuild a model from its recorded config, and record a ``Trainer`` run.

``pip install trajscope[huggingface]``. Imports ``transformers`` (only this module does)::

    trainer = transformers.Trainer(model, args, train_dataset=ds)
    trainer.add_callback(TrajscopeCallback("runs/exp1"))          # the one line
    trainer.train()

* :func:`from_config` is the model factory a run of a ``transformers`` model names
  (``model.spec``, allow-listed): it builds the recorded architecture from ``config.to_dict()``
  with random weights (the checkpoints hold the weights; nothing is downloaded), with eager
  attention and no cache, and its ``forward`` returns the logits tensor instead of an output
  object, so the analysis can differentiate the loss w.r.t. the model output.
* :class:`TrajscopeCallback` records every optimizer step of the Trainer with ``loss="model"``
  (:mod:`trajscope.modelloss`): the batch of a step is every micro-batch the model was called
  with since the last step (``gradient_accumulation_steps``), without ``labels`` as inputs and
  the labels as targets; its loss is the loss of that joined batch. Under
  ``num_items_in_batch`` (the Trainer's token count over all micro-batches of the step) each
  micro-batch's ``outputs.loss`` is a partial sum over the step's count; the callback turns it
  back into the micro-batch's own mean before giving it to the Recorder, which weights the
  micro-batches by their counted tokens.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from trajscope.errors import TrajscopeError

__all__ = ["from_config", "model_spec", "TrajscopeCallback"]

SPEC = "trajscope.integrations.huggingface:from_config"


# --------------------------------------------------------------------------- the model factory
@functools.cache
def _logits_class(cls: type) -> type:
    """``cls`` whose forward returns ``outputs.logits`` (a tensor) instead of the output object; its
    modules and parameters are named as ``cls`` names them."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = cls.forward(self, *args, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    return type(
        cls.__name__, (cls,), {"forward": forward, "__module__": __name__, "__qualname__": f"logits_of.{cls.__name__}"}
    )


def _architecture(name: str) -> type:
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise TrajscopeError(f"{name!r} is not a transformers model class (transformers {transformers.__version__})")
    return cls


def from_config(architecture: str, config: Mapping[str, Any]) -> nn.Module:
    """The ``transformers`` model class ``architecture`` built from ``config`` (a ``config.to_dict()``),
    randomly initialised, eager attention, no cache; ``forward`` returns the logits tensor."""
    cls = _architecture(architecture)
    cfg = cls.config_class.from_dict(dict(config))
    cfg.use_cache = False
    cfg._attn_implementation = "eager"  # same function as sdpa; differentiable twice on every device
    return _logits_class(cls)(cfg)


def model_spec(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """``(spec, kwargs)`` that :func:`from_config` rebuilds ``model`` from, or None when ``model`` is not
    an instance of a ``transformers`` model class (with a config)."""
    cls = type(model)
    config = getattr(model, "config", None)
    if getattr(transformers, cls.__name__, None) is not cls or not hasattr(config, "to_json_string"):
        return None
    return SPEC, {"architecture": cls.__name__, "config": json.loads(config.to_json_string(use_diff=False))}


# --------------------------------------------------------------------------- the Trainer callback
class TrajscopeCallback(transformers.TrainerCallback):
    """Records a ``transformers.Trainer`` run to ``path`` with a :class:`trajscope.Recorder`.

    Args:
        path: the run folder.
        **recorder_kwargs: passed to the Recorder (``every``, ``window``, ``probe``, ``overwrite``,
            ``resume``, ...); the loss is always the model's and the model spec its config.

    The micro-batches of a step (every training call of the model since the last optimizer step)
    are given to the Recorder right before the step, each with the loss the step trained on:
    the sum of the micro-batches' ``outputs.loss`` under ``num_items_in_batch`` (each is a partial
    sum over the step's token count), else their mean (the Trainer divides each by the
    accumulation steps). The replayed loss is the model loss of the joined batch; at the first
    step the callback checks which token count the Trainer divided by (the predicted tokens, or
    the labels before the shift for models without a ``loss_type``) and records that
    denominator, so the replay is the function trained.

    The Trainer gives callbacks no optimizer, so the Recorder is made at the first optimizer step
    (a global step pre-hook finds the optimizer that steps the model's parameters). An existing
    run at ``path`` without ``overwrite`` or ``resume``, or a model whose loss trajscope cannot
    replay, is refused at ``on_train_begin``, before anything is trained; any later failure warns
    and stops recording, never training.
    """

    def __init__(self, path: str | Path, **recorder_kwargs: Any) -> None:
        for key in ("loss", "loss_fn", "model_spec", "model_kwargs"):
            if key in recorder_kwargs:
                raise ValueError(f"TrajscopeCallback sets {key} itself (the model's loss and config)")
        self.path, self.recorder_kwargs = Path(path), recorder_kwargs
        self.recorder: Any = None
        self.failed: str | None = None
        self._model: nn.Module | None = None
        self._loss: Any = None
        self._micro: list[tuple[Any, Any, Any, Any]] = []  # (inputs, labels, loss, num_items) of this step
        self._hooks: list[Any] = []
        self._finder: Any = None
        self._step0 = 0

    # -- Trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> None:
        from trajscope import modelloss
        from trajscope.io.layout import is_run
        from trajscope.io.specs import unwrap_model

        if model is None:
            raise TrajscopeError("TrajscopeCallback: the Trainer gave no model to record")
        if is_run(self.path) and not (self.recorder_kwargs.get("overwrite") or self.recorder_kwargs.get("resume")):
            raise TrajscopeError(
                f"{self.path} already holds a recorded run: pass resume=True to continue it "
                f"or overwrite=True to replace it"
            )
        self._model = unwrap_model(model)[0]
        self._loss = modelloss.for_model(self._model)  # an unsupported model: one line, before training
        self._step0 = int(state.global_step)
        self._hooks.append(self._model.register_forward_hook(self._on_forward, with_kwargs=True))
        self._finder = register_optimizer_step_pre_hook(self._on_first_step)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.recorder:
            self._flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._finder is not None and self.recorder is not None:  # not from inside the hook loop
            self._finder.remove()
            self._finder = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.close()

    def close(self) -> None:
        """Finish the run (the Trainer's ``on_train_end`` calls it)."""
        if self._finder is not None:
            self._finder.remove()
            self._finder = None
        self._unhook()
        if self.recorder:
            self.recorder.close()

    # -- hooks ---------------------------------------------------------------------------------
    def _unhook(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _stop(self, what: str, e: BaseException) -> None:
        """Warn once and stop recording; training goes on."""
        self.failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"trajscope: TrajscopeCallback stops recording ({what}): {self.failed}", stacklevel=3)
        self._unhook()
        self._micro.clear()
        if self.recorder:
            self.recorder.close()
        self.recorder = False

    def _on_first_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.recorder is not None or self._model is None:
            return
        mine = {id(p) for p in self._model.parameters()}
        if not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
            return
        from trajscope.record.recorder import Recorder

        try:
            self._loss = _matching_denominator(self._loss, self._micro)
            # made inside the step's pre-hooks: its own pre-hook, added to this optimizer now, runs next
            self.recorder = Recorder(
                self.path, self._model, optimizer, self._loss, step=self._step0, **self.recorder_kwargs
            )
            self._flush()
        except Exception as e:  # never break training
            self._stop("at its first step", e)

    def _flush(self) -> None:
        """Give the step's micro-batches to the Recorder, each with the loss of the whole step."""
        micro, self._micro = self._micro, []
        losses = [m[2] for m in micro]
        step_loss = None
        if losses and all(isinstance(v, torch.Tensor) for v in losses):
            total = sum(float(v) for v in losses)
            step_loss = total if micro[0][3] is not None else total / len(losses)
        try:
            for inputs, labels, _, _ in micro:
                self.recorder.batch(inputs, labels, loss=step_loss)
        except Exception as e:  # never break training
            self._stop("giving a batch", e)

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Mapping[str, Any], output: Any) -> None:
        if not module.training or not torch.is_grad_enabled() or self.recorder is False:
            return
        try:
            batch = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k != "num_items_in_batch"}
            if args or "labels" not in batch:
                return  # not a training call of the Trainer's (it calls model(**inputs) with labels)
            inputs, labels = self._loss.split(batch)
            loss = getattr(output, "loss", None)
            self._micro.append(
                (
                    inputs,
                    labels,
                    loss.detach() if isinstance(loss, torch.Tensor) else None,
                    kwargs.get("num_items_in_batch"),
                )
            )
        except Exception as e:  # never break training
            self._stop("reading a batch", e)


def _matching_denominator(loss: Any, micro: list[tuple[Any, Any, Any, Any]]) -> Any:
    """The causal-LM loss whose token count is the one the Trainer divided the first step by."""
    from trajscope.modelloss import ModelLoss

    n_items = micro[0][3] if micro else None
    if loss.task != "causal_lm" or n_items is None:
        return loss
    for denominator in ("shifted", "labels"):
        candidate = ModelLoss("causal_lm", denominator=denominator)
        if sum(candidate.count(m[1]) for m in micro) == int(n_items):
            return candidate
    return loss
