r"""The replayed loss of one batch, as a function of the parameters.

.. math::
    L(\theta) = \ell\big(f(x; \theta, \beta),\, y\big)

for a model f with parameters θ and buffers β on a batch (x, y), with the loss ℓ of the run.
:class:`Problem` binds these (and, where the analysis replays training as it was, the
train-mode forward of :mod:`trajscope.replay.trainmode`) so that curvature and sharpness take
one object instead of the argument list ``(model, params, buffers, inputs, targets, loss_fn)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from trajscope.replay.functional import functional_forward

__all__ = ["Problem"]


@dataclass
class Problem:
    """One batch's loss as a function of the parameters.

    Attributes:
        model: the module (evaluated functionally: its own tensors are not used).
        params, buffers: tensors keyed like ``model.named_parameters()`` / ``named_buffers()``;
            the analysis dtype is that of the parameters.
        inputs: a tensor → ``model(x)``; tuple → ``model(*x)``; dict → ``model(**x)``.
        targets: second argument of ``loss_fn(output, targets)``.
        loss_fn: a loss that is a sum or mean of per-sample terms over the batch.
        replay: a :class:`trajscope.replay.trainmode.Replay` (train-mode layers as recorded: one
            forward pass per micro-batch, recorded flags and RNG state); None: one pass in eval mode.
    """

    model: nn.Module
    params: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor]
    inputs: Any
    targets: Any
    loss_fn: Callable[[Any, Any], Tensor]
    replay: Any = None

    def forward(self, leaves: Mapping[str, Tensor]) -> Any:
        """The model output :math:`f(x; \\theta, \\beta)` with the parameters ``leaves`` (tensors
        keyed like ``params``, typically leaves that require grad), in the caller's grad mode."""
        if self.replay is not None:
            return self.replay.forward(self.model, leaves, self.buffers, self.inputs)
        return functional_forward(self.model, {**leaves, **self.buffers}, self.inputs)

    def loss(self, output: Any) -> Tensor:
        """:math:`\\ell(f, y)` of a model output ``f``."""
        return self.loss_fn(output, self.targets)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in eval mode for the replay (train-mode layers are the replay's business),
        its own mode restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)
