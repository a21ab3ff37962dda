r"""Global sharpness: the largest Hessian eigenvalue by Lanczos on Hessian-vector products (docs/spec.md §8).

.. math::
    \lambda_{\max}\big(\nabla^2_\theta L\big) \quad\text{or, for Adam,}\quad
    \lambda_{\max}\big(P^{1/2}\, \nabla^2_\theta L\, P^{1/2}\big),\ P = \mathrm{diag}\big(1/(\sqrt{\hat v}+\epsilon)\big)

over all parameters together. Every node block :math:`H_i` is a principal submatrix of the full
Hessian, so by Cauchy interlacing :math:`\lambda_{\max}(H_i) \le` sharpness.

Each Hessian-vector product is a double backward pass through the graph of the gradient, which
is built once per operator (cost ≈ 2–3 gradients per product). The Lanczos process typically
needs a few dozen products for a relative accuracy of 1e-4, against ~100 for a plain power
iteration of similar accuracy.

It runs without restarts and keeps three vectors: with m steps it builds the tridiagonal
:math:`T_m = Q_m^\top H Q_m` and stops when the largest Ritz value :math:`\theta` of
:math:`T_m`, with eigenvector s, has residual :math:`\|H y - \theta y\| = \beta_{m+1}|s_m|
\le \mathrm{tol}\,\max(|\theta|, \varepsilon^{2/3}\|T_m\|)`: ARPACK's criterion, its floor made
relative to the spectrum's scale so that a top eigenvalue of 0 converges too. Without full
re-orthogonalisation the basis loses orthogonality only as Ritz pairs converge (Paige), which leaves converged Ritz values
accurate; keeping the whole basis, as ARPACK does, would stream ``ncv`` vectors of the parameter
size at every step, which cost 3x the products themselves on a 670k-parameter MLP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trajscope.linalg.lanczos import _lanczos_max, _NonFinite
from trajscope.replay.problem import Problem

__all__ = ["SharpnessResult", "hvp_operator", "sharpness"]

# below this many parameters the Hessian is formed densely (Lanczos gains nothing)
_DENSE_DIM = 32


@dataclass
class SharpnessResult:
    """``value``: the largest eigenvalue (NaN for non-finite parameters or loss);
    ``n_hvp``: Hessian-vector products used; ``converged``: ``tol`` was met within ``maxiter`` products."""

    value: float
    n_hvp: int
    converged: bool


def _unit(dim: int, i: int, device: torch.device) -> Tensor:
    """The i-th basis vector, a fresh tensor (rows of ``torch.eye`` are views, which torch's
    lazy-tensor device, used by the tests to check device handling, mishandles in backward)."""
    e = torch.zeros(dim, dtype=torch.float64, device=device)
    e[i] = 1.0
    return e


def hvp_operator(
    problem: Problem,
    names: Sequence[str] | None = None,
) -> tuple[Callable[[Any], Any], int]:
    r"""The map :math:`v \mapsto \nabla^2_\theta L\, v` on the flattened parameters ``names``.

    The flat layout is the concatenation of ``params[k].flatten()`` for ``k`` in ``names``
    (default: every floating-point parameter, in ``params`` order); the other parameters are held
    fixed. The callable takes a 1-D tensor or numpy array of length ``dim`` and returns the same
    kind (numpy in float64; a tensor in the parameters' dtype). It has attributes ``loss``
    (the loss, a tensor), ``names`` and ``count`` (products computed so far).

    The gradient graph is built once here (forward + backward with ``create_graph``) and kept
    alive by the callable; each product is one extra backward pass through it.

    ``problem`` (:class:`~trajscope.replay.problem.Problem`) is evaluated as training did where it
    has a ``replay`` (train-mode layers, recorded RNG state, per micro-batch), else in one pass
    in eval mode.
    """
    params = problem.params
    if names is None:
        names = [k for k, v in params.items() if v.is_floating_point()]
    names = list(names)
    leaves = {
        k: (v.detach().requires_grad_(k in names) if v.is_floating_point() else v.detach()) for k, v in params.items()
    }
    xs = [leaves[k] for k in names]
    sizes = [x.numel() for x in xs]
    dim = int(sum(sizes))
    dtype = xs[0].dtype if xs else torch.get_default_dtype()
    device = xs[0].device if xs else torch.device("cpu")
    with problem.eval_mode(), torch.enable_grad():
        loss = problem.loss(problem.forward(leaves))
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


def sharpness(
    problem: Problem,
    *,
    precond: Mapping[str, Tensor] | None = None,
    shift: Mapping[str, float] | None = None,
    tol: float = 1e-4,
    maxiter: int = 300,
) -> SharpnessResult:
    r"""Largest eigenvalue of the full Hessian over all floating-point parameters, or of
    :math:`P^{1/2} (H + W) P^{1/2}` when ``precond`` (a positive diagonal P keyed by parameter
    name, shaped like the parameters; missing names count as 1) is given; W = 0, or the
    diagonal of per-parameter ``shift`` values (Adam's coupled L2 decay: the curvature its map
    sees, docs/spec.md §5).

    The Lanczos process on Hessian-vector products (module docstring); ``tol`` is the relative
    residual of the Ritz value (ARPACK's criterion) and ``maxiter`` the limit on products. The
    start vector is a fixed pseudo-random vector (results are reproducible). Fewer than 32
    parameters: the Hessian is formed with ``dim`` products and solved densely.

    Non-finite parameters, loss or products give ``value = nan``; this function does not raise
    for them. ``problem``: as for :func:`hvp_operator`.
    """
    nan = SharpnessResult(math.nan, 0, False)
    params = problem.params
    fl = {k: v for k, v in params.items() if v.is_floating_point()}
    if not all(bool(torch.isfinite(v).all()) for v in fl.values()):
        return nan
    mv, dim = hvp_operator(problem)
    if dim == 0 or not bool(torch.isfinite(mv.loss).all()):
        return nan
    dev = params[mv.names[0]].device  # the Lanczos vectors live with the parameters
    scale = None
    if precond is not None:
        scale = torch.cat(
            [
                (
                    precond[k].detach().to(dev, torch.float64).clamp_min(0).sqrt().reshape(-1)
                    if k in precond
                    else torch.ones(params[k].numel(), dtype=torch.float64, device=dev)
                )
                for k in mv.names
            ]
        )

    w = None
    if shift and any(float(shift.get(k, 0.0)) for k in mv.names):
        w = torch.cat(
            [
                torch.full((params[k].numel(),), float(shift.get(k, 0.0)), dtype=torch.float64, device=dev)
                for k in mv.names
            ]
        )

    def op(v: Tensor) -> Tensor:
        u = v * scale if scale is not None else v
        hv = mv(u).to(torch.float64)
        if w is not None:
            hv = hv + w * u
        return hv.mul_(scale) if scale is not None else hv

    try:
        if dim <= _DENSE_DIM:
            H = torch.stack([op(_unit(dim, i, dev)) for i in range(dim)], dim=1)
            if not bool(torch.isfinite(H).all()):
                raise _NonFinite
            val = float(torch.linalg.eigvalsh(0.5 * (H + H.T))[-1])
            return SharpnessResult(val, mv.count, True)
        v0 = torch.from_numpy(np.random.default_rng(0).standard_normal(dim)).to(dev)
        val, ok = _lanczos_max(op, v0, tol, maxiter)
        return SharpnessResult(val, mv.count, ok)
    except _NonFinite:
        return SharpnessResult(math.nan, mv.count, False)
