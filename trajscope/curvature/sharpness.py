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
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trajscope.linalg.lanczos import _lanczos_max, _NonFinite
from trajscope.replay.problem import Problem

__all__ = ["SharpnessResult", "sharpness"]

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
    for them. ``problem``: as for :meth:`~trajscope.replay.problem.Problem.hvp_operator`.
    """
    nan = SharpnessResult(math.nan, 0, False)
    params = problem.params
    fl = {k: v for k, v in params.items() if v.is_floating_point()}
    if not all(bool(torch.isfinite(v).all()) for v in fl.values()):
        return nan
    mv, dim = problem.hvp_operator()
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
