"""Saving the model as a ``torch.export`` program, the replay fallback for runs without an import spec."""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn


def export_model(model: nn.Module, inputs: Any, path: str) -> None:
    """Save ``torch.export`` of ``model`` (eval mode) with a dynamic batch dimension to ``path``."""
    from torch.export import Dim, export, save

    batch = Dim("batch")
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    else:
        args, kwargs = tuple(inputs), {}

    def dyn(t: Any) -> Any:
        return {0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None

    dynamic = {"args": tuple(dyn(a) for a in args), "kwargs": {k: dyn(v) for k, v in kwargs.items()}}
    sig = inspect.signature(model.forward)
    # torch.export wants dynamic_shapes keyed like forward's parameters.
    names = list(sig.parameters)
    shapes: dict[str, Any] = {}
    for i, a in enumerate(args):
        shapes[names[i]] = dynamic["args"][i]
    shapes.update(dynamic["kwargs"])
    ep = export(model, args, kwargs, dynamic_shapes=shapes)
    save(ep, path)
