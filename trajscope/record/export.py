"""Saving the model as a ``torch.export`` program, the replay fallback for runs without an import spec."""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trajscope.record.snapshot import _detached_copy

log = logging.getLogger("trajscope")


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


def export_twin(
    model: nn.Module, inputs: Any, extra_path: Callable[[str], Path], memo: Mapping[int, Any]
) -> dict[str, Any]:
    """Export a CPU copy of ``model`` (eval mode), traced with ``inputs``, to ``path``; best effort.

    Args:
        model: the live model (left untouched).
        inputs: the first recorded batch's inputs.
        extra_path: the store's path of an extra file by name (``extra/model.pt2`` here).
        memo: ``copy.deepcopy`` memo of objects the copy must share, not copy (the recorder).

    Returns:
        The update of the run's ``model`` attributes: ``exported`` and ``export_error``.
    """
    tmp = None
    try:
        # memo: a loss module inside the model carries this recorder's forward hook, not to be copied
        twin = copy.deepcopy(model, dict(memo)).to("cpu").eval()
        path = extra_path("model.pt2")
        # Write aside and rename: a kill mid-save (or a resumed run re-exporting) never leaves a
        # truncated program where the attributes point. torch.export.save wants a .pt2 suffix.
        tmp = path.with_name(path.stem + ".partial.pt2")
        export_model(twin, _detached_copy(inputs), str(tmp))
        os.replace(tmp, path)
        update = {"exported": "extra/model.pt2", "export_error": None}
    except Exception as e:  # export is best effort: replay can use the import spec
        update = {
            "exported": None,
            "export_error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
        }
        log.info("trajscope: torch.export failed (%s); replay will need model_spec or --model", e)
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return update
