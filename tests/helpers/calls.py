"""The curvature entry points on the argument lists the tests are written with.

``node_curvature`` and ``sharpness`` take a :class:`~trajscope.replay.problem.Problem` (``hvp_operator`` is its method);
most cases build their model, parameters, batch and loss separately, so these wrappers bind them."""

from __future__ import annotations

from typing import Any

from trajscope.curvature import node as _node
from trajscope.curvature import sharpness as _sharpness
from trajscope.replay.problem import Problem


def node_curvature(model, params, buffers, inputs, targets, loss_fn, *args: Any, replay=None, **kw: Any):
    """:func:`trajscope.curvature.node.node_curvature` of ``Problem(model, ..., loss_fn, replay)``."""
    return _node.node_curvature(Problem(model, params, buffers, inputs, targets, loss_fn, replay), *args, **kw)


def sharpness(model, params, buffers, inputs, targets, loss_fn, *, replay=None, **kw: Any):
    """:func:`trajscope.curvature.sharpness.sharpness` of ``Problem(model, ..., loss_fn, replay)``."""
    return _sharpness.sharpness(Problem(model, params, buffers, inputs, targets, loss_fn, replay), **kw)


def hvp_operator(model, params, buffers, inputs, targets, loss_fn, names=None, replay=None):
    """:meth:`trajscope.replay.problem.Problem.hvp_operator` of ``Problem(model, ..., loss_fn, replay)``."""
    return Problem(model, params, buffers, inputs, targets, loss_fn, replay).hvp_operator(names)
