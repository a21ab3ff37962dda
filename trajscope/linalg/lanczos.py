r"""The largest eigenvalue of a symmetric operator by the Lanczos process (no restarts, three vectors;
the stopping rule and why there is no full re-orthogonalisation: :mod:`trajscope.curvature.sharpness`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


class _NonFinite(Exception):
    pass


def _lanczos_max(
    op: Callable[[Tensor], Tensor],
    v0: Tensor,
    tol: float,
    maxiter: int,
) -> tuple[float, bool]:
    """Largest eigenvalue of the symmetric operator ``op`` (float64 vectors) by the Lanczos
    process from ``v0``: (value, converged within ``maxiter`` products)."""
    from scipy.linalg import eigh_tridiagonal

    q = v0 / v0.norm()
    q_prev = torch.zeros_like(q)
    alphas: list[float] = []
    betas: list[float] = []
    beta = tnorm = 0.0
    theta = math.nan
    floor = np.finfo(np.float64).eps ** (2 / 3)  # ARPACK's: a top eigenvalue of 0 still converges
    for m in range(1, maxiter + 1):
        w = op(q)
        alpha = float(q @ w)
        w.add_(q, alpha=-alpha).add_(q_prev, alpha=-beta)
        c = float(q @ w)  # one local re-orthogonalisation pass against q
        w.add_(q, alpha=-c)
        alphas.append(alpha + c)
        beta_prev, beta = beta, float(w.norm())
        if not (math.isfinite(alphas[-1]) and math.isfinite(beta)):
            raise _NonFinite
        tnorm = max(tnorm, abs(alphas[-1]) + beta + beta_prev)  # ≥ ‖T_m‖ estimate (Gershgorin)
        if m == 1:
            theta, s_last = alphas[0], 1.0
        else:
            val, vec = eigh_tridiagonal(np.array(alphas), np.array(betas), select="i", select_range=(m - 1, m - 1))
            theta, s_last = float(val[0]), float(vec[-1, 0])
        if beta * abs(s_last) <= tol * max(abs(theta), floor * tnorm) or beta <= 1e-14 * tnorm:
            return theta, True  # converged, or an invariant subspace (T_m exact there)
        betas.append(beta)
        q_prev, q = q, w.div_(beta)
    return theta, False
