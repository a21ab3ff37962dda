"""Node kinematics between two checkpoints: norm, decay ratio, direction drift (docs/spec.md §6).

For node vectors θ_t (N, p) and θ_{t+k}:

* param_norm  ‖θ_t‖;
* rho         ρ = (‖θ_{t+k}‖ / ‖θ_t‖)^{1/k}, the per-step decay ratio (geometric mean over
              the k steps; exact one-step ratio when k = 1);
* drift       ‖u_{t+k} − u_t‖ with u = θ/‖θ‖: the chord between the two directions on the
              unit sphere, 2·sin(φ/2) for an angle φ, in [0, 2] (sign-sensitive: a flip is
              2). It is a k-step drift, not divided by k (a chord does not scale with time).

A zero norm leaves the direction undefined: drift is NaN, and ρ is NaN when ‖θ_t‖ = 0
(ρ = 0 when only ‖θ_{t+k}‖ is 0: an exact collapse). Non-finite input gives NaN/Inf
output, never an exception. Computed in float64, returned as float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["node_kinematics"]


def node_kinematics(theta: Tensor, theta_next: Tensor | None, k: int = 1) -> dict[str, Tensor]:
    """``{"param_norm", "rho", "drift"}``, each float32 (N,), for nodes θ_t → θ_{t+k}.

    ``theta``, ``theta_next``: (N, p) node vectors at checkpoints t and t + k (k ≥ 1 steps
    apart); ``theta_next=None`` (no later checkpoint) gives NaN rho and drift.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 steps between checkpoints, got {k}")
    th0 = theta.detach().to(torch.float64)
    if th0.dim() == 1:
        th0 = th0[None, :]
    n0 = torch.linalg.vector_norm(th0, dim=1)
    nan = torch.full_like(n0, math.nan)
    if theta_next is None:
        return {"param_norm": n0.float(), "rho": nan.float(), "drift": nan.clone().float()}
    th1 = theta_next.detach().to(torch.float64).reshape(th0.shape)
    n1 = torch.linalg.vector_norm(th1, dim=1)
    ok0 = n0 > 0  # False for 0 and NaN
    ratio = n1 / torch.where(ok0, n0, torch.ones_like(n0))
    rho = torch.where(ok0, ratio if k == 1 else ratio.pow(1.0 / k), nan)
    ok = ok0 & (n1 > 0)
    # u1 − u0 directly (not √(2 − 2cos)): no cancellation for small drifts. Formed in place in
    # private float64 copies: wide layers make these (N, p) passes the cost of this function.
    u0 = th0.clone() if th0.data_ptr() == theta.data_ptr() else th0
    u1 = th1.clone() if th1.data_ptr() == theta_next.data_ptr() else th1
    u0.div_(torch.where(ok0, n0, torch.ones_like(n0))[:, None])
    u1.div_(torch.where(n1 > 0, n1, torch.ones_like(n1))[:, None]).sub_(u0)
    drift = torch.where(ok, torch.linalg.vector_norm(u1, dim=1), nan)
    return {"param_norm": n0.float(), "rho": rho.float(), "drift": drift.float()}
