"""Calling a model on inputs in their recorded form (tensor, tuple/list or dict), optionally with the
parameters and buffers of a recorded state substituted (``torch.func.functional_call``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def call_model(model: Callable, inputs: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def functional_forward(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: Any) -> Any:
    """Evaluate ``model`` with parameters/buffers ``state`` substituted (``torch.func.functional_call``)."""
    if isinstance(inputs, Mapping):
        return torch.func.functional_call(model, dict(state), (), dict(inputs))
    if isinstance(inputs, (tuple, list)):
        return torch.func.functional_call(model, dict(state), tuple(inputs))
    return torch.func.functional_call(model, dict(state), (inputs,))
