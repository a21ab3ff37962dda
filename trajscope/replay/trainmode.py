r"""Replaying the forward pass of a recorded step as training ran it (``--train-mode replay``).

The Recorder keeps, per micro-batch of a recorded step, what its forward pass used
(:class:`~trajscope.io.records.ForwardState`): the modules' train/eval flags and the RNG state the pass
started from. Replay evaluates

.. math:: f = \big[f_{\theta}^{(1)}(x^{(1)});\ \dots;\ f_{\theta}^{(M)}(x^{(M)})\big],

one forward pass per micro-batch, each with the recorded flags and the recorded RNG state restored
first, outputs concatenated along the batch axis. So BatchNorm normalises with the statistics of
each micro-batch, as in training (its running-statistic buffers are the recorded ones, passed as
copies: ``functional_call`` would update them in place), and dropout draws the masks training drew.
Every forward pass the analysis makes for a checkpoint (curvature, gradients, sharpness, the
fidelity check) goes through :meth:`Replay.forward`, so all of them see the same function of θ.
The caller's RNG state and module flags are restored afterwards.

With BatchNorm on batch statistics the loss no longer is a sum of per-sample terms in the layer
outputs (the samples of a micro-batch are coupled), which :mod:`trajscope.curvature.blocks`
handles with its coupled route (:meth:`Replay.batch_statistics`).

Masks that cannot be reproduced, said once per run as a WARNING: dropout drawn from a CUDA
generator replayed elsewhere, and dropout under ``torch.compile`` (inductor draws its own random
numbers). There dropout is replayed off and BatchNorm still uses batch statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from trajscope.io import specs
from trajscope.io.records import ForwardState
from trajscope.replay.functional import functional_forward

__all__ = ["TRAIN_MODES", "Replay", "mode_sensitive", "plan"]

TRAIN_MODES = ("replay", "off")


def mode_sensitive(model: nn.Module, recorded: Sequence[str] | None = None) -> list[str]:
    """Names of the modules whose function depends on their train/eval flag (BatchNorm, dropout); for
    a model without module types (an exported program), the names the Recorder wrote (``recorded``)."""
    return specs.mode_sensitive(model) or list(recorded or [])


def _slice(x: Any, start: int, n: int) -> Any:
    """Samples ``start .. start + n`` of model inputs (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(x, Tensor):
        return x[start : start + n] if x.dim() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_slice(v, start, n) for v in x)
    if isinstance(x, Mapping):
        return {k: _slice(v, start, n) for k, v in x.items()}
    return x


def _cat(outs: Sequence[Any]) -> Any:
    """Micro-batch outputs joined along the batch axis (tensors, or tuples/lists/dicts of them)."""
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.cat(list(outs)) if first.dim() else first
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: _cat([o[k] for o in outs]) for k in first}
    return first


@dataclass
class Replay:
    """How the analysis evaluates the model at one checkpoint.

    ``micro`` empty: one forward pass in eval mode (dropout off, BatchNorm on running statistics),
    the behaviour of ``--train-mode off``. Otherwise one pass per recorded micro-batch with its
    flags and RNG state; ``dropout=False`` turns dropout off (masks that cannot be reproduced)."""

    micro: list[ForwardState] = field(default_factory=list)
    dropout: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def sizes(self) -> list[int] | None:
        """Samples per forward pass, or None for a single eval pass over the batch."""
        return [fs.size for fs in self.micro] if self.micro else None

    @property
    def calls(self) -> int:
        """Forward passes per evaluation (each node layer is called this many times)."""
        return max(1, len(self.micro))

    def _flags(self, model: nn.Module, fs: ForwardState | None) -> None:
        if fs is None:
            model.eval()
            return
        model.train(fs.training)
        subs = dict(model.named_modules())
        for name in fs.differ:  # that module alone (its children are listed when they differ too)
            if name in subs:
                subs[name].training = not fs.training
        if not self.dropout:
            for m in model.modules():
                if isinstance(m, _DropoutNd):
                    m.eval()

    def batch_statistics(self, model: nn.Module) -> bool:
        """Whether a BatchNorm normalises with batch statistics in this replay (the samples of a
        forward pass are then coupled: curvature takes its coupled route)."""
        flags = {n: m.training for n, m in model.named_modules()}
        try:
            out = False
            for fs in self.micro or [None]:
                self._flags(model, fs)
                out |= any(
                    isinstance(m, _BatchNorm) and (m.training or m.running_mean is None) for m in model.modules()
                )
            return out
        finally:
            _restore(model, flags)

    def forward(
        self, model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], inputs: Any
    ) -> Any:
        """The model output on ``inputs`` with ``params`` and ``buffers`` substituted, replayed as
        recorded (module docstring). Buffers are copied for every pass, so nothing passed in changes."""
        flags = {n: m.training for n, m in model.named_modules()}
        cpu_state = torch.get_rng_state()
        cuda = self.device.type == "cuda" and any(fs.rng_cuda is not None for fs in self.micro)
        cuda_state = torch.cuda.get_rng_state(self.device) if cuda else None
        try:
            if not self.micro:
                self._flags(model, None)
                return functional_forward(model, {**params, **buffers}, inputs)
            outs, start = [], 0
            for fs in self.micro:
                self._flags(model, fs)
                torch.set_rng_state(fs.rng_cpu)
                if cuda and fs.rng_cuda is not None:
                    torch.cuda.set_rng_state(fs.rng_cuda, self.device)
                state = {**params, **{k: v.clone() for k, v in buffers.items()}}
                outs.append(functional_forward(model, state, _slice(inputs, start, fs.size)))
                start += fs.size
            return _cat(outs)
        finally:
            _restore(model, flags)
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, self.device)


def _restore(model: nn.Module, flags: Mapping[str, bool]) -> None:
    for n, m in model.named_modules():
        if n in flags:
            m.training = flags[n]


def _batch_size(inputs: Any) -> int | None:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else None
    items = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else []
    return next((n for n in map(_batch_size, items) if n is not None), None)


def _active_dropout(model: nn.Module, micro: Sequence[ForwardState]) -> bool:
    """Whether a dropout module with p > 0 trains in any of the recorded forward passes."""
    replay = Replay(micro)
    flags = {n: m.training for n, m in model.named_modules()}
    try:
        for fs in micro:
            replay._flags(model, fs)
            if any(isinstance(m, _DropoutNd) and m.training and m.p > 0 for m in model.modules()):
                return True
        return False
    finally:
        _restore(model, flags)


def plan(
    model: nn.Module,
    forward: list[ForwardState] | None,
    inputs: Any,
    device: str | torch.device,
    *,
    mode: str = "replay",
    exported: bool = False,
    compiled: bool = False,
    probe: bool = False,
    recorded_sensitive: Sequence[str] | None = None,
) -> tuple[Replay, str | None]:
    """The replay of one checkpoint and, where it departs from the forward pass that was trained,
    why (one sentence; None when it does not, or when the model has no BatchNorm/dropout).

    ``forward`` is the checkpoint's recorded state (None: not recorded), ``inputs`` the batch to
    replay, ``exported``: the model is a ``torch.export`` program (its mode was fixed at export),
    ``compiled``: training ran it under ``torch.compile``, ``probe``: ``inputs`` is the probe batch,
    which no recorded forward pass saw (replayed in eval mode: a deterministic function, comparable
    across checkpoints), ``recorded_sensitive``: the BatchNorm and
    dropout modules the Recorder saw (the model attribute ``mode_sensitive``)."""
    device = torch.device(device)
    eval_replay = Replay(device=device)
    if mode == "off":
        return eval_replay, None
    if not mode_sensitive(model, recorded_sensitive):
        return eval_replay, None  # the flags change nothing: one pass, as before
    if exported:
        return eval_replay, (
            "the model is the exported program, whose train/eval mode was fixed (eval) at export: "
            "BatchNorm and dropout are replayed in eval mode (pass --model with the model's factory)"
        )
    if probe:
        return eval_replay, (
            "the probe batch is replayed in eval mode (BatchNorm on running statistics, dropout "
            "off): no forward pass of it was recorded"
        )
    if forward is None:
        return eval_replay, (
            "the run does not record its forward passes' train/eval flags and RNG state (recorded "
            "by an older trajscope): BatchNorm and dropout are replayed in eval mode"
        )
    if not forward:
        return eval_replay, (
            "no forward pass of the recorded model was seen for some steps' batches: those steps "
            "are replayed in eval mode"
        )
    if sum(fs.size for fs in forward) != _batch_size(inputs):
        return eval_replay, (
            "the analysed batch is not the one whose forward passes were recorded (a probe, or "
            "micro-batches of other sizes): it is replayed in eval mode"
        )
    replay = Replay(list(forward), device=device)
    if _active_dropout(model, forward):
        why = None
        if compiled:
            why = "training ran under torch.compile, whose dropout draws its own random numbers"
        elif any(fs.rng_cuda is not None for fs in forward) and device.type != "cuda":
            why = f"its masks were drawn on CUDA and the analysis runs on {device.type}"
        if why:
            replay.dropout = False
            return replay, (
                f"dropout cannot be replayed with the masks training used ({why}): it is replayed off "
                f"(BatchNorm still uses batch statistics); analyse on the training device to reproduce them"
            )
    return replay, None
