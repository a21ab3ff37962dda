"""The training thread's private copy of a recorded step (:class:`~trajscope.io.records.Snapshot`):
parameters, buffers, optimizer state and hyperparameters, the step's micro-batches joined, and its loss."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from trajscope.errors import TrajscopeError
from trajscope.io.packing import make_layout, numeric_hparams, pack, unflatten_batch
from trajscope.io.records import Snapshot
from trajscope.modelloss import ModelLoss


class Snapshots:
    """How the :class:`~trajscope.record.recorder.Recorder` copies a step, in reused buffers."""

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
            raise TrajscopeError(
                "the optimizer's parameter groups changed during the run (add_param_group): "
                "recording stops here; record the rest to a new folder"
            )
        full = not self.rank  # a rank > 0 records its batch shard and loss only
        params = pack(self._param_layout, [p for _, p in self._param_items], self._alloc) if full else {}
        buffers = (
            pack(self._buffer_layout, [b for _, b in self._buffer_items], self._alloc)
            if self._buffer_items and full
            else {}
        )
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
        return Snapshot(
            step=step,
            loss=loss if loss is not None else math.nan,
            params=params,
            buffers=buffers,
            hparams=hp if full else None,
            state_layout=layout,
            state=state,
            batch_spec=spec,
            batch=leaves,
            forward=forward,
            grad_norms=grad_norms,
        )

    def _join(
        self, micro: list[tuple[Any, list[tuple[str, torch.Tensor]]]]
    ) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
        """The step's batch: its micro-batches (gradient accumulation) joined along the batch axis."""
        if len(micro) == 1:
            return micro[0]
        spec, first = micro[0]
        joinable = all(s == spec and [k for k, _ in ls] == [k for k, _ in first] for s, ls in micro) and all(
            t.dim() >= 1 and t.shape[1:] == micro[0][1][i][1].shape[1:] and t.dtype == micro[0][1][i][1].dtype
            for _, ls in micro
            for i, (_, t) in enumerate(ls)
        )
        if not joinable:
            if not self._warned_join:
                self._warned_join = True
                warnings.warn(
                    "trajscope: the micro-batches of a step differ in structure or trailing shape and "
                    "cannot be joined: such steps record only their last micro-batch",
                    stacklevel=3,
                )
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
        if sum(sizes) == 0:  # nothing counted (every label ignored): the plain mean
            return sum(vals) / k
        return sum(v * n for v, n in zip(vals, sizes)) / sum(sizes)

    def _micro_weight(self, micro: tuple[Any, list[tuple[str, torch.Tensor]]]) -> int:
        """A micro-batch's weight in the step's mean loss: its samples, or the terms a model loss counts."""
        if isinstance(self.loss_fn, ModelLoss):
            return self.loss_fn.count(unflatten_batch(micro[0], dict(micro[1]))[1])
        return _batch_size(micro[1])


def _batch_size(leaves: list[tuple[str, torch.Tensor]]) -> int:
    """Samples in a micro-batch: the leading size of its first leaf (inputs come first)."""
    return int(leaves[0][1].shape[0]) if leaves and leaves[0][1].dim() else 1


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
