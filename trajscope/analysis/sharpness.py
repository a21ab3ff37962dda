r"""Global sharpness: the largest Hessian eigenvalue by Lanczos on Hessian-vector products (SPEC §8).

.. math::
    \lambda_{\max}\big(\nabla^2_\theta L\big) \quad\text{or, for Adam,}\quad
    \lambda_{\max}\big(P^{1/2}\, \nabla^2_\theta L\, P^{1/2}\big),\ P = \mathrm{diag}\big(1/(\sqrt{\hat v}+\epsilon)\big)

over all parameters together. Every node block :math:`H_i` is a principal submatrix of the full
Hessian, so by Cauchy interlacing :math:`\lambda_{\max}(H_i) \le` sharpness.

Each Hessian-vector product is a double backward pass through the graph of the gradient, which
is built once per operator (cost ≈ 2–3 gradients per product). ARPACK's implicitly restarted
Lanczos (``scipy.sparse.linalg.eigsh``, ``which="LA"``) typically needs a few dozen products for
a relative accuracy of 1e-4, against ~100 for a plain power iteration of similar accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from trajscope.capture import functional_forward

__all__ = ["SharpnessResult", "hvp_operator", "sharpness"]

# below this many parameters the Hessian is formed densely (ARPACK needs k < n and gains nothing)
_DENSE_DIM = 32
# Lanczos basis size: ARPACK keeps ncv float64 vectors of the parameter size and streams them
# at every step; 12 needs as few products as the default 20 here with 40% less memory traffic
_NCV = 12


def _single_threaded_blas():
    """ARPACK's BLAS (scipy's OpenBLAS) spins its own threads between calls, which slows the
    Hessian-vector products that torch runs in between by 2x or more on a small machine:
    limit it to one thread where ``threadpoolctl`` is installed."""
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(1, user_api="blas")
    except Exception:
        import contextlib
        return contextlib.nullcontext()


@dataclass
class SharpnessResult:
    """``value``: the largest eigenvalue (NaN for non-finite parameters or loss);
    ``n_hvp``: Hessian-vector products used; ``converged``: ARPACK met ``tol`` within ``maxiter``."""

    value: float
    n_hvp: int
    converged: bool


class _NonFinite(Exception):
    pass


def hvp_operator(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], Tensor],
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
    """
    if names is None:
        names = [k for k, v in params.items() if v.is_floating_point()]
    names = list(names)
    leaves = {k: (v.detach().requires_grad_(k in names) if v.is_floating_point() else v.detach())
              for k, v in params.items()}
    xs = [leaves[k] for k in names]
    sizes = [x.numel() for x in xs]
    dim = int(sum(sizes))
    dtype = xs[0].dtype if xs else torch.get_default_dtype()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = functional_forward(model, {**leaves, **dict(buffers)}, inputs)
            loss = loss_fn(out, targets)
            gs = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
    finally:
        model.train(was_training)
    # products only flow through gradient pieces that still depend on the parameters
    live = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    def matvec(v):
        is_np = not isinstance(v, Tensor)
        vt = torch.as_tensor(np.asarray(v) if is_np else v).reshape(-1).to(dtype)
        matvec.count += 1
        res: list[Tensor | None] = [None] * len(xs)
        if live:
            pieces = [vt[offsets[i]:offsets[i + 1]].view_as(xs[i]) for i in live]
            with torch.enable_grad():
                hv = torch.autograd.grad([gs[i] for i in live], [xs[i] for i in live], pieces,
                                         retain_graph=True, allow_unused=True)
            for i, h in zip(live, hv):
                res[i] = h
        out_v = torch.cat([(h.detach() if h is not None else torch.zeros_like(x)).reshape(-1)
                           for h, x in zip(res, xs)]) if xs else vt.new_zeros(0)
        return out_v.to(torch.float64).numpy() if is_np else out_v

    matvec.count = 0
    matvec.loss = loss.detach()
    matvec.names = names
    return matvec, dim


def sharpness(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    precond: Mapping[str, Tensor] | None = None,
    tol: float = 1e-4,
    maxiter: int = 300,
) -> SharpnessResult:
    r"""Largest eigenvalue of the full Hessian over all floating-point parameters, or of
    :math:`P^{1/2} H P^{1/2}` when ``precond`` (a positive diagonal P keyed by parameter name,
    shaped like the parameters; missing names count as 1) is given.

    Implicitly restarted Lanczos (ARPACK via ``scipy.sparse.linalg.eigsh``, ``k=1``,
    ``which="LA"``) on a ``LinearOperator`` of Hessian-vector products; ``tol`` is ARPACK's
    relative accuracy of the Ritz value and ``maxiter`` its limit on restarts. The start vector
    is a fixed pseudo-random vector (results are reproducible). Fewer than 32 parameters: the
    Hessian is formed with ``dim`` products and solved densely.

    Non-finite parameters, loss or products give ``value = nan``; this function does not raise
    for them.
    """
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

    nan = SharpnessResult(math.nan, 0, False)
    fl = {k: v for k, v in params.items() if v.is_floating_point()}
    if not all(bool(torch.isfinite(v).all()) for v in fl.values()):
        return nan
    mv, dim = hvp_operator(model, params, buffers, inputs, targets, loss_fn)
    if dim == 0 or not bool(torch.isfinite(mv.loss).all()):
        return nan
    scale = None
    if precond is not None:
        scale = np.concatenate([
            (precond[k].detach().to(torch.float64).clamp_min(0).sqrt().reshape(-1).numpy()
             if k in precond else np.ones(params[k].numel()))
            for k in mv.names])

    def op(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        if scale is not None:
            v = scale * v
        hv = mv(v)
        if scale is not None:
            hv = scale * hv
        if not np.all(np.isfinite(hv)):
            raise _NonFinite
        return hv

    try:
        if dim <= _DENSE_DIM:
            H = np.stack([op(e) for e in np.eye(dim)], axis=1)
            val = float(np.linalg.eigvalsh(0.5 * (H + H.T))[-1])
            return SharpnessResult(val, mv.count, True)
        A = LinearOperator((dim, dim), matvec=op, dtype=np.float64)
        v0 = np.random.default_rng(0).standard_normal(dim)
        try:
            with _single_threaded_blas():
                vals = eigsh(A, k=1, which="LA", tol=tol, maxiter=maxiter, v0=v0,
                             ncv=min(dim - 1, _NCV), return_eigenvectors=False)
            return SharpnessResult(float(np.max(vals)), mv.count, True)
        except ArpackNoConvergence as exc:
            ev = np.asarray(exc.eigenvalues)
            return SharpnessResult(float(ev.max()) if ev.size else math.nan, mv.count, False)
    except (_NonFinite, ArpackError):
        return SharpnessResult(math.nan, mv.count, False)
