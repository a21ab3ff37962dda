r"""The replayed loss of one batch, as a function of the parameters.

.. math::
    L(\theta) = \ell\big(f(x; \theta, \beta),\, y\big)

for a model f with parameters θ and buffers β on a batch (x, y), with the loss ℓ of the run.
:class:`Problem` binds these (and, where the analysis replays training as it was, the
train-mode forward of :mod:`trajscope.replay.trainmode`) so that curvature and sharpness take
one object instead of the argument list ``(model, params, buffers, inputs, targets, loss_fn)``, and
gives the autograd leaves, the forward pass, the loss and Hessian-vector products of that loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
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

    def leaves(self, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The parameters detached, as new autograd leaves: floating-point ones in ``names`` (default:
        all) require grad, the others are held fixed."""
        return {
            k: (v.detach().requires_grad_(names is None or k in names) if v.is_floating_point() else v.detach())
            for k, v in self.params.items()
        }

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

    def hvp_operator(self, names: Sequence[str] | None = None) -> tuple[Callable[[Any], Any], int]:
        r"""The map :math:`v \mapsto \nabla^2_\theta L\, v` on the flattened parameters ``names``.

        The flat layout is the concatenation of ``params[k].flatten()`` for ``k`` in ``names``
        (default: every floating-point parameter, in ``params`` order); the other parameters are held
        fixed. The callable takes a 1-D tensor or numpy array of length ``dim`` and returns the same
        kind (numpy in float64; a tensor in the parameters' dtype). It has attributes ``loss``
        (the loss, a tensor), ``names`` and ``count`` (products computed so far).

        The gradient graph is built once here (forward + backward with ``create_graph``) and kept
        alive by the callable; each product is one extra backward pass through it.

        The loss is evaluated as training did where the problem has a ``replay`` (train-mode layers,
        recorded RNG state, per micro-batch), else in one pass in eval mode.
        """
        names = [k for k, v in self.params.items() if v.is_floating_point()] if names is None else list(names)
        leaves = self.leaves(names)
        xs = [leaves[k] for k in names]
        sizes = [x.numel() for x in xs]
        dim = int(sum(sizes))
        dtype = xs[0].dtype if xs else torch.get_default_dtype()
        device = xs[0].device if xs else torch.device("cpu")
        with self.eval_mode(), torch.enable_grad():
            loss = self.loss(self.forward(leaves))
            gs = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
        # products only flow through gradient pieces that still depend on the parameters
        live = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

        def matvec(v):
            is_np = not isinstance(v, Tensor)
            vt = torch.as_tensor(np.asarray(v) if is_np else v).reshape(-1).to(device, dtype)
            matvec.count += 1
            res: list[Tensor | None] = [None] * len(xs)
            if live:
                pieces = [vt[offsets[i] : offsets[i + 1]].view_as(xs[i]) for i in live]
                with torch.enable_grad():
                    hv = torch.autograd.grad(
                        [gs[i] for i in live], [xs[i] for i in live], pieces, retain_graph=True, allow_unused=True
                    )
                for i, h in zip(live, hv):
                    res[i] = h
            out_v = (
                torch.cat([(h.detach() if h is not None else torch.zeros_like(x)).reshape(-1) for h, x in zip(res, xs)])
                if xs
                else vt.new_zeros(0)
            )
            return out_v.to("cpu", torch.float64).numpy() if is_np else out_v

        matvec.count = 0
        matvec.loss = loss.detach()
        matvec.names = names
        return matvec, dim
