"""The Recorder's options as given: the loss named by ``loss_fn`` or ``loss``."""
from __future__ import annotations

from typing import Any

from torch import nn

from trajscope.modelloss import for_model


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
