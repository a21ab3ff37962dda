r"""The loss a model computes inside its forward pass (``Recorder(..., loss="model")``), as a function
of the model's logits and the labels, so that the analysis can differentiate it w.r.t. the output.

Hugging Face models return ``outputs.loss`` when called with ``labels``. Replay needs the loss as
``loss_fn(logits, labels)`` (the GGN uses :math:`\partial^2 L/\partial f^2`), so trajscope records
which of the models' known losses it is and replays it with its own copy (torch only, no
``transformers`` import), matching ``transformers.loss.loss_utils``:

* ``causal_lm`` (``loss_type`` ``ForCausalLM``; ``*LMHeadModel`` classes, which fall back to it):
  labels shifted left by one (position t predicts label t+1), cross-entropy with
  ``ignore_index=-100``, mean over the counted (non-ignored) tokens of the whole batch
  (``denominator="labels"``: the sum over them divided by the non-ignored labels before the
  shift, which is what ``transformers.Trainer`` divides by under ``num_items_in_batch`` for
  models without a ``loss_type``, GPT-2's ``GPT2LMHeadModel`` among them);
* ``masked_lm`` (``ForMaskedLM``) and ``token_classification`` (``ForTokenClassification``):
  the same without the shift;
* ``sequence_classification`` (``ForSequenceClassification`` and the image, audio and video
  classification heads that share it): by ``config.problem_type``: ``regression`` (MSE, logits and
  labels squeezed when ``num_labels == 1``), ``single_label_classification`` (cross-entropy,
  ``ignore_index=-100``), ``multi_label_classification`` (BCE with logits); when the config says
  none, chosen from the labels as the model does (``num_labels == 1``: regression; integer labels:
  single-label; else multi-label).

Other models (question answering, detection, CTC, encoder-decoder generation, ...) are refused
with one line at ``Recorder`` construction: pass a ``loss_fn`` of ``(output, targets)`` instead.

The recorded batch of such a run is ``(inputs without "labels", labels)``: the model is called as
``model(**inputs)`` and the loss as ``loss_fn(logits, labels)``. The analysis preflight and the
fidelity check compare this replayed loss with the ``outputs.loss`` recorded at each step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from trajscope.errors import TrajscopeError

__all__ = ["ModelLoss", "for_model", "SPEC"]

#: the import spec a run names for this loss (allow-listed in :mod:`trajscope.trust`)
SPEC = "trajscope.modelloss:ModelLoss"
TASKS = ("causal_lm", "masked_lm", "token_classification", "sequence_classification")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
IGNORE_INDEX = -100

# transformers' LOSS_MAPPING keys -> task
_LOSS_TYPES = {
    "ForCausalLM": "causal_lm",
    "ForMaskedLM": "masked_lm",
    "ForTokenClassification": "token_classification",
    "ForSequenceClassification": "sequence_classification",
    "ForImageClassification": "sequence_classification",
    "ForAudioClassification": "sequence_classification",
    "ForVideoClassification": "sequence_classification",
}


class ModelLoss:
    """``loss_fn(logits, labels)`` equal to the ``outputs.loss`` of a Hugging Face model (see the module doc).

    Args:
        task: one of ``causal_lm``, ``masked_lm``, ``token_classification``, ``sequence_classification``.
        problem_type: sequence classification only: ``config.problem_type`` (None: from the labels).
        num_labels: sequence classification only: ``config.num_labels``.
        denominator: causal LM only: ``"shifted"`` (the mean over the predicted tokens) or
            ``"labels"`` (their sum over the count of non-ignored labels, unshifted).
    """

    reduction = "mean"

    def __init__(
        self, task: str, problem_type: str | None = None, num_labels: int | None = None, denominator: str = "shifted"
    ) -> None:
        if task not in TASKS:
            raise TrajscopeError(f"model loss task {task!r} is not one of {', '.join(TASKS)}")
        if problem_type not in PROBLEM_TYPES:
            raise TrajscopeError(
                f"problem_type {problem_type!r} is not one of {', '.join(map(str, PROBLEM_TYPES[1:]))}"
            )
        if denominator not in ("shifted", "labels"):
            raise TrajscopeError(f"denominator {denominator!r} is not 'shifted' or 'labels'")
        self.task, self.problem_type, self.denominator = task, problem_type, denominator
        self.num_labels = None if num_labels is None else int(num_labels)

    def describe(self) -> dict[str, Any]:
        """The run's loss description (:func:`trajscope.io.specs.build_loss` rebuilds it)."""
        return {
            "class": SPEC,
            "kwargs": {
                "task": self.task,
                "problem_type": self.problem_type,
                "num_labels": self.num_labels,
                "denominator": self.denominator,
            },
            "computed_by": "model",
        }

    def __repr__(self) -> str:
        return (
            f"ModelLoss({self.task!r}, problem_type={self.problem_type!r}, num_labels={self.num_labels}, "
            f"denominator={self.denominator!r})"
        )

    # ------------------------------------------------------------------ the loss
    def _problem(self, labels: torch.Tensor) -> str:
        if self.problem_type is not None:
            return self.problem_type
        if self.num_labels == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int):
            return "single_label_classification"
        return "multi_label_classification"

    def __call__(self, logits: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = getattr(logits, "logits", logits)  # a model output object as well as the tensor
        labels = labels.to(logits.device)
        if self.task == "causal_lm":
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            if self.denominator == "labels":
                total = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    shifted.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                return total / (labels != IGNORE_INDEX).sum()
            labels = shifted
        if self.task != "sequence_classification":
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        problem = self._problem(labels)
        if problem == "regression":
            labels = labels.to(logits.dtype)
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    def count(self, labels: torch.Tensor) -> int:
        """How many terms the mean runs over: the weight of a micro-batch in the step's loss."""
        if self.task == "causal_lm" and self.denominator == "shifted":
            return int((labels[..., 1:] != IGNORE_INDEX).sum())
        if self.task != "sequence_classification" or self._problem(labels) == "single_label_classification":
            return int((labels != IGNORE_INDEX).sum())
        return int(labels.numel())

    # ------------------------------------------------------------------ the batch
    @staticmethod
    def split(inputs: Any, targets: Any = None) -> tuple[Any, Any]:
        """``(inputs without "labels", labels)`` from the batch given to the model (``targets`` None),
        or the pair as given when the labels are already apart."""
        if targets is not None:
            return inputs, targets
        if not isinstance(inputs, Mapping) or "labels" not in inputs:
            raise TrajscopeError(
                "with loss='model', rec.batch() takes the batch the model was called with, "
                "a dict holding 'labels' (or inputs and labels apart)"
            )
        return {k: v for k, v in inputs.items() if k != "labels"}, inputs["labels"]


def _task_of(model: Any) -> str | None:
    loss_type = getattr(model, "loss_type", None)
    name = type(model).__name__
    if loss_type is None:  # transformers' own rule: the class name, else ForCausalLM for models that ask
        found = re.findall("(" + "|".join(_LOSS_TYPES) + ")", name)
        loss_type = found[0] if found else ("ForCausalLM" if name.endswith("LMHeadModel") else None)
    return _LOSS_TYPES.get(loss_type) if isinstance(loss_type, str) else None


def for_model(model: Any) -> ModelLoss:
    """The :class:`ModelLoss` of ``model``, or a TrajscopeError (one line) when it is not supported."""
    config = getattr(model, "config", None)
    task = _task_of(model)
    if config is None or task is None or getattr(config, "is_encoder_decoder", False):
        raise TrajscopeError(
            f"loss='model' supports Hugging Face causal LM, masked LM, token and sequence classification models; "
            f"{type(model).__name__} (loss_type {getattr(model, 'loss_type', None)!r}) computes another loss: "
            f"pass loss_fn, a function of (output, targets)"
        )
    if task != "sequence_classification":
        return ModelLoss(task)
    return ModelLoss(task, getattr(config, "problem_type", None), getattr(config, "num_labels", None))
