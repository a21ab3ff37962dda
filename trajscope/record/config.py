"""The Recorder's options, validated and resolved once (:func:`configure`): the bare model inside its
wrappers, the loss named by ``loss_fn`` or ``loss``, this process's rank, the cadence and the defaults
that depend on the others (``window``, ``export``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from trajscope.io import specs
from trajscope.io.layout import STORE_NAME, local_run_path, shard_store_name
from trajscope.modelloss import ModelLoss, for_model
from trajscope.record.describe import model_spec_of
from trajscope.record.distributed import _process_group


@dataclass(frozen=True)
class RecorderConfig:
    """What a :class:`~trajscope.record.recorder.Recorder` was asked to do, with every default resolved."""

    path: Path  # the run folder
    model: nn.Module  # the bare model (what the replayed model is)
    wrappers: list[str]  # torch.compile / DDP wrapper classes around it, outermost first
    loss_fn: Any
    rank: int
    world_size: int
    store: str  # this rank's store name in the run folder
    every: int
    window: int
    export: bool
    model_spec: str | None
    model_kwargs: Mapping[str, Any] | None
    probe: Any
    background: bool | None
    memory_budget: int
    when_behind: str
    resume: bool
    step: int | None
    overwrite: bool


def configure(
    path: str | Path,
    model: nn.Module,
    loss_fn: Any,
    *,
    every: int,
    window: int | None,
    model_spec: str | None,
    model_kwargs: Mapping[str, Any] | None,
    export: bool | None,
    probe: Any,
    background: bool | None,
    memory_budget: int,
    when_behind: str,
    resume: bool,
    step: int | None,
    overwrite: bool,
    distributed: bool | None,
    loss: Any,
) -> RecorderConfig:
    """Check the Recorder's arguments (``ValueError``/``TrajscopeError`` for bad ones, in the order the
    Recorder documents) and resolve their defaults. Touches no file."""
    if every < 1:
        raise ValueError("every must be >= 1")
    if when_behind not in ("wait", "skip"):
        raise ValueError("when_behind must be 'wait' or 'skip'")
    path = local_run_path(path)
    # torch.compile / DDP wrappers prefix every name (_orig_mod., module.): record the bare model's
    # names, which are what the replayed model has.
    model, wrappers = specs.unwrap_model(model)
    loss_fn = _model_loss(model, loss_fn, loss)
    if model_spec is None and isinstance(loss_fn, ModelLoss):
        model_spec, model_kwargs = model_spec_of(model) or (None, model_kwargs)
    rank, world_size = _process_group(distributed)
    if rank:  # ranks > 0 write their batch shard and loss only, to their own store
        export = False
    return RecorderConfig(
        path=path,
        model=model,
        wrappers=wrappers,
        loss_fn=loss_fn,
        rank=rank,
        world_size=world_size,
        store=shard_store_name(rank) if rank else STORE_NAME,
        every=int(every),
        window=int(window if window is not None else (1 if every == 1 else 2)),
        # By default the exported program is the fallback for runs without an import spec (README): it
        # costs the training thread ~80 ms for a small MLP, far more for large models.
        export=bool(export) if export is not None else model_spec is None,
        model_spec=model_spec,
        model_kwargs=model_kwargs,
        probe=probe,
        background=background,
        memory_budget=int(memory_budget),
        when_behind=when_behind,
        resume=resume,
        step=step,
        overwrite=overwrite,
    )


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
