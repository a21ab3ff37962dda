"""What one recorded step holds in memory: the :class:`Snapshot` the recorder hands the writer
and the :class:`ForwardState` of each micro-batch (written and read back as ``forward/*``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from trajscope.io.packing import Slot


# --------------------------------------------------------------------------- writer
@dataclasses.dataclass
class Snapshot:
    """Everything one recorded step writes; tensors are private CPU copies."""

    step: int
    loss: float
    params: dict[str, torch.Tensor]  # pack -> flat
    buffers: dict[str, torch.Tensor]  # pack -> flat
    hparams: np.ndarray | None  # (G, H); None: a rank's batch shard (rank 0 writes them)
    state_layout: list[Slot] | None
    state: dict[str, torch.Tensor]  # pack -> flat
    batch_spec: Any
    batch: list[tuple[str, torch.Tensor]]  # leaves
    forward: list[ForwardState] = dataclasses.field(default_factory=list)  # per micro-batch
    # GRAD_NORM_COLUMNS: floats, or 0-d tensors the writer converts (no device sync on the training thread)
    grad_norms: tuple[Any, Any] = (math.nan, math.nan)

    @property
    def nbytes(self) -> int:
        tensors = [*self.params.values(), *self.buffers.values(), *self.state.values(), *(t for _, t in self.batch)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclasses.dataclass
class ForwardState:
    """What the forward pass of one micro-batch used, taken as it started (a forward pre-hook on the
    module given to the Recorder): which modules were in train mode and the RNG state its dropout
    masks were drawn from. Replay restores it (``trajscope analyze --train-mode replay``)."""

    size: int  # samples of the micro-batch
    training: bool  # the root module's flag
    differ: tuple[str, ...]  # submodules whose flag differs from the root's
    rng_cpu: torch.Tensor  # torch.get_rng_state() (uint8)
    rng_cuda: torch.Tensor | None = None  # torch.cuda.get_rng_state(cuda_device) (uint8)
    cuda_device: int | None = None  # the model's CUDA device, when it trained on one

    @property
    def mode(self) -> dict[str, Any]:
        return {"training": bool(self.training), "differ": sorted(self.differ)}
