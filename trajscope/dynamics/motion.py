r"""What a node's recorded motion excites: the curvature along it and its split over the map's directions.

The update map of node i acts, in the coordinates :math:`\tilde\theta = (DA)^{-1/2}\theta` of its
optimizer, through the symmetric operator

.. math::  A_i = H_i \ \text{(SGD family)}, \qquad
           A_i = (DA)^{1/2}\,(s H_i + \mathrm{diag}(c))\,(DA)^{1/2} \ \text{(adaptive, maximising, mixed groups)},

whose eigenvalue a of each direction gives that direction's multipliers μ(a) (the roots of
:mod:`~trajscope.dynamics.updatemap`). The node's motion u_i (θ_next − θ, or the step direction)
excites the directions it has components along:

* :func:`motion_curvature`: the Rayleigh quotient :math:`\lambda_u = \tilde u^\top A_i \tilde u /
  \tilde u^\top\tilde u`, from the layer factor (no block formed);
* :func:`motion_from_eigs`: the roots μ_u of the map of a direction with curvature λ_u, as
  max |μ_u| (``motion_radius``) and min |μ_u − 1| (what the excited label preset tests);
* :func:`motion_fractions`: the fractions :math:`\sum_{k \in S} (v_k^\top \tilde u)^2 / \|\tilde u\|^2`
  of the motion along the eigenvectors v_k of A_i whose map is neutral (some |μ(a_k) − 1| ≤ δ) or
  unstable (some |μ(a_k)| > 1 + δ); dense p × p eigenvectors, so opt-in (``motion_fractions=True``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from trajscope.curvature.blocks import block_quadratic_forms, dense_blocks
from trajscope.curvature.factors import LayerFactor
from trajscope.dynamics.optimizers import NodeMap, UpdateRule
from trajscope.dynamics.updatemap import update_map_eigenvalues

__all__ = ["map_scale", "motion_curvature", "motion_from_eigs", "motion_fractions"]

#: nodes per tile of dense p × p eigenproblems in :func:`motion_fractions` is bounded by this many bytes
_TILE_BYTES = 64 * 2**20


def map_scale(nm: NodeMap, precond: Tensor | None, like: Tensor) -> Tensor:
    """(DA) per node coordinate, ``like``'s shape (N, p): the preconditioner times the lr ratios (1 for
    the SGD family)."""
    d = torch.ones_like(like, dtype=torch.float64) if precond is None else precond.to(torch.float64)
    return d * nm.lr_scale.to(d) if nm.lr_scale is not None else d


def motion_curvature(factor: LayerFactor, nm: NodeMap, u: Tensor, precond: Tensor | None, clip: float = 1.0) -> Tensor:
    r"""λ_u (N,) float64: the curvature of the map's operator along the motion u (N, p).

    Without ``nm.transformed``: :math:`u^\top H_i u / u^\top u`; with it, in the coordinates
    :math:`\tilde u = (DA)^{-1/2}u`: :math:`(s\,u^\top H_i u + \sum_k c_k u_k^2) / \sum_k u_k^2/(DA)_k`.
    ``clip`` (the step's clip factor, ≤ 1) scales H_i as the clipped step's map does. NaN where u = 0."""
    quad = clip * block_quadratic_forms(factor, u)
    if not nm.transformed:
        den = (u * u).sum(dim=1)
    else:
        d = map_scale(nm, precond, u)
        c = torch.as_tensor(nm.shift, dtype=torch.float64).reshape(-1)
        quad = nm.sign * quad + (c * u * u).sum(dim=1)
        den = torch.where(d > 0, u * u / torch.where(d > 0, d, 1.0), 0.0).sum(dim=1)
    return torch.where(den > 0, quad / torch.where(den > 0, den, 1.0), math.nan)


def motion_from_eigs(lam_u: Tensor, rule: UpdateRule) -> tuple[Tensor, Tensor]:
    """``(motion_radius, motion_neutral)`` (N,) float64 from the motion curvature λ_u (N,).

    The roots μ_u of the update map of one direction with curvature λ_u (the same map
    :func:`~trajscope.dynamics.updatemap.node_update_spectra` applies to every eigenvalue):
    max |μ_u| and min |μ_u − 1|. NaN λ_u (no motion) gives NaN for both.
    """
    lam = lam_u.to(torch.float64).reshape(-1, 1)
    mu, _null = update_map_eigenvalues(lam, 1, rule)
    bad = torch.isnan(lam[:, 0])
    nan = torch.full_like(lam[:, 0], math.nan)
    radius = torch.where(bad, nan, mu.abs().amax(dim=1))
    neutral = torch.where(bad, nan, (mu - 1).abs().amin(dim=1))
    return radius, neutral


def motion_fractions(
    factor: LayerFactor,
    nm: NodeMap,
    rule: UpdateRule,
    u: Tensor,
    precond: Tensor | None,
    delta: float,
    clip: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``(neutral, unstable)`` (N,) float64: the fractions of the motion u (N, p) along the neutral and
    the unstable eigen-directions of each node's map (module docstring); NaN where u = 0 or the
    factor is NaN. ``rule`` is the map applied to the eigenvalues of A_i (``nm.rule``); ``clip`` as
    in :func:`motion_curvature`.

    Cost: one dense p × p symmetric eigendecomposition with vectors per node (float64), in tiles
    of at most 64 MiB."""
    n, p = u.shape
    neutral = torch.full((n,), math.nan, dtype=torch.float64)
    unstable = neutral.clone()
    d = map_scale(nm, precond, u) if nm.transformed else None
    ut = u.to(torch.float64) if d is None else torch.where(d > 0, u / torch.where(d > 0, d, 1.0).sqrt(), 0.0)
    norm2 = (ut * ut).sum(dim=1)
    tile = max(1, _TILE_BYTES // (8 * 3 * p * p))
    for s in range(0, n, tile):
        ii = list(range(s, min(n, s + tile)))
        A = clip * dense_blocks(factor, ii).to(torch.float64).cpu()
        if d is not None:
            c = torch.as_tensor(nm.shift, dtype=torch.float64).reshape(-1)
            sq = d[ii].sqrt()
            A = sq[:, :, None] * (nm.sign * A + torch.diag_embed(c.expand(len(ii), p))) * sq[:, None, :]
        ok = torch.isfinite(A).flatten(1).all(dim=1) & (norm2[ii] > 0)
        if not bool(ok.any()):
            continue
        A = torch.where(ok[:, None, None], A, torch.zeros((), dtype=A.dtype))
        w, V = torch.linalg.eigh(0.5 * (A + A.mT))
        share = (V.mT @ ut[ii, :, None])[..., 0] ** 2 / torch.where(ok, norm2[ii], 1.0)[:, None]  # (t, p)
        mu, _null = update_map_eigenvalues(w, p, rule)  # (t, p) or (t, 2p): [first roots | second roots]
        roots = mu.reshape(len(ii), -1, p)
        is_neutral = ((roots - 1).abs() <= delta).any(dim=1)
        is_unstable = (roots.abs() - 1 > delta).any(dim=1)
        idx = torch.tensor(ii)[ok]
        neutral[idx] = (share * is_neutral).sum(dim=1)[ok]
        unstable[idx] = (share * is_unstable).sum(dim=1)[ok]
    return neutral, unstable
