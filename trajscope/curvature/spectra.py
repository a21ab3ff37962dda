r"""Spectra of the node blocks from their factors (:mod:`trajscope.curvature.blocks` has the maths).

With R the rank bound of a block (B, C·B or B·T), ``r = min(p, R)`` eigenvalues are
returned per node. When R < p the *Gram route* is used: the non-zero spectrum of
:math:`F^\top W F` equals that of :math:`W^{1/2} F F^\top W^{1/2}` (W ⪰ 0) or of
:math:`(FF^\top)^{1/2} W (FF^\top)^{1/2}` (W indefinite), an R × R problem; for a 2-D Linear
layer :math:`F = \tilde A` and the Gram matrix :math:`\tilde A\tilde A^\top` is shared by every
node of the layer, and only the samples with :math:`e_{ij} \ne 0` enter (dead ReLU samples drop
out). Otherwise dense p × p blocks are formed with batched matmuls. Big matmuls run in the
analysis dtype (the parameters'), the eigenproblems in that precision too (float32 below
float64, see :func:`_solve_dtype`; float32 batches go to the vectorised kernel of
:mod:`trajscope.linalg.eigen`); the spectra are returned as float64.

Memory and parallelism: nodes are processed in tiles built lazily by a small pool of worker
threads (one per torch thread, each solving single-threaded: batched eigensolvers on small
matrices do not use several cores), with one tile in flight per worker, so the tiles
in memory together never exceed ``max_tile_bytes``; no path holds all p × p blocks of a layer.
Largest eigen-batches are scheduled first, across all layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trajscope.curvature.blocks import _blockdiag, _dense, _node_groups, _operands
from trajscope.curvature.factors import LayerFactor
from trajscope.linalg import eigen
from trajscope.linalg.eigen import _LANES, _buckets, _eigvalsh, _finalize, _live_first, _psd_sqrt, _solve_dtype
from trajscope.linalg.pool import _pool_map

__all__ = ["node_hessian_extremes", "preconditioned_eigvals", "bias_group_eigvals"]


@dataclass
class _Job:
    """One batch of node eigenproblems: ``build()`` gives ``(n, m, m)`` symmetric matrices whose
    spectra (padded with zeros) are those of the nodes ``idx``; built lazily in a worker so
    that at most one tile per worker is in memory."""

    idx: Tensor
    build: Callable[[], Tensor]
    cost: float
    out: Tensor
    r: int
    p: int
    eps: float
    solve_dtype: torch.dtype


def _run_jobs(jobs: list[_Job]) -> None:
    """Solve all jobs (largest first, on the eigen pool) and scatter the finalized spectra."""
    jobs = sorted(jobs, key=lambda j: -j.cost)

    def solve(j: _Job) -> Tensor:
        return _finalize(_eigvalsh(j.build(), j.solve_dtype), j.r, j.p, j.eps)

    for j, ev in zip(jobs, _pool_map(solve, jobs)):
        j.out[j.idx.cpu()] = ev


def _tile_bytes(factor: LayerFactor, route: str, precond: bool) -> int:
    """Rough peak bytes per node of one tile (sizes the tiles to ``max_tile_bytes``)."""
    p, R = factor.p, factor.rank_bound
    it = torch.finfo(factor.dtype).bits // 8
    per_node_F = (factor.form == "sqrt" or precond) * R * p * it
    if factor.form == "block":
        per_node_F += factor.E[0].numel() * it * (2 if route == "dense" else 1)
        if route == "gram":
            per_node_F += 3 * R * R * 8
    if route == "dense":
        return per_node_F + 3 * p * p * 8 + R * p * it
    return per_node_F + 4 * R * R * 8


def _shared_gram(factor: LayerFactor, g: int, F: Tensor, sqrt: bool, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""Cached Gram matrix :math:`F F^\top` of group g (or, in float64, its square root)."""
    key = ("G", g)
    if key not in factor.cache:
        factor.cache[key] = (F @ F.mT).to(torch.float64)
    if sqrt:
        if ("R", g) not in factor.cache:
            factor.cache[("R", g)] = _psd_sqrt(factor.cache[key])
        return factor.cache[("R", g)]
    if ("G", g, dtype) not in factor.cache:
        factor.cache[("G", g, dtype)] = factor.cache[key].to(dtype)
    return factor.cache[("G", g, dtype)]


@dataclass
class _Plan:
    """What the jobs of one factor share: the output buffer, the solve settings, the column
    scaling ``sd`` (:math:`D^{1/2}`, or None) and the diagonal shift (on the factor's device)."""

    factor: LayerFactor
    out: Tensor
    r: int
    eps: float
    solve: torch.dtype
    sd: Tensor | None
    shift: Tensor
    shifted: bool
    workers: int
    jobs: list[_Job] = field(default_factory=list)

    def add(self, idx: Tensor, build: Callable[[], Tensor], m: int) -> None:
        self.jobs.append(
            _Job(idx, build, float(len(idx)) * m**3, self.out, self.r, self.factor.p, self.eps, self.solve)
        )

    def split(self, idx: Tensor) -> list[Tensor]:
        """Enough jobs for every worker."""
        size = max(4, -(-len(idx) // (2 * self.workers)))
        return list(idx.split(size))


def _jobs(
    factor: LayerFactor,
    precond: Tensor | None,
    shift: float | Tensor,
    max_tile_bytes: int,
) -> tuple[Tensor, list[_Job]]:
    r"""Output buffer ``(N, r')`` and the jobs that fill it with the eigenvalues of
    :math:`D_i^{1/2}(H_i + \mathrm{diag}(s))D_i^{1/2}` (D = I without ``precond``; s a scalar
    or one value per node coordinate, ``(p,)``).

    Routes: ``dense`` forms the p × p blocks; ``gram`` the R × R matrices with the same
    non-zero spectrum: :math:`FF^\top` (W = I), :math:`W^{1/2}FF^\top W^{1/2}` restricted to
    the samples with :math:`w \ne 0` (diagonal W ⪰ 0), or :math:`(FF^\top)^{1/2} W
    (FF^\top)^{1/2}` (indefinite or block W)."""
    N, p = factor.n_nodes, factor.p
    dev = factor.device
    shift = torch.as_tensor(shift, dtype=torch.float64).cpu()
    shifted = bool((shift != 0).any())
    if factor.form in ("zero", "nan"):
        return _constant_spectra(factor, precond, shift, shifted), []
    route = "dense" if shifted else factor.method
    r = p if shifted else factor.r
    out = torch.empty(N, r, dtype=torch.float64)  # spectra are gathered on the CPU
    sd = None if precond is None else precond.to(dev, factor.dtype).clamp_min(0).sqrt()
    nw = max(1, torch.get_num_threads())
    plan = _Plan(
        factor, out, r, torch.finfo(factor.dtype).eps, _solve_dtype(factor.dtype), sd, shift.to(dev), shifted, nw
    )
    budget = max(1, max_tile_bytes // nw)  # one tile in flight per worker
    tile = int(max(1, min(N, budget // max(_tile_bytes(factor, route, sd is not None), 1))))
    # 2-D Linear: process nodes in order of their live-sample count (tight Gram buckets)
    order = torch.argsort((factor.e != 0).sum(1), stable=True) if factor.form == "diag" else torch.arange(N, device=dev)
    with torch.no_grad():
        for s in range(0, N, tile):
            for g, _, idx_g in _node_groups(factor, order[s : s + tile]):
                if route == "dense":
                    _dense_jobs(plan, g, idx_g)
                elif factor.form == "diag" and bool((factor.e[idx_g] >= 0).all()):
                    _psd_gram_jobs(plan, g, idx_g)
                elif factor.form == "sqrt":
                    _gram_jobs(plan, g, idx_g)
                else:
                    _sqrt_gram_jobs(plan, g, idx_g)
    return out, plan.jobs


def _constant_spectra(factor: LayerFactor, precond: Tensor | None, shift: Tensor, shifted: bool) -> Tensor:
    """Spectra of a ``"zero"`` (those of the shift, :math:`s D_i`) or ``"nan"`` factor."""
    N, p = factor.n_nodes, factor.p
    r = p if shifted else 1
    if factor.form == "nan":
        return torch.full((N, r), math.nan, dtype=torch.float64)
    if not shifted:
        return torch.zeros(N, 1, dtype=torch.float64)
    d = precond.to("cpu", torch.float64) if precond is not None else torch.ones(N, p, dtype=torch.float64)
    return (shift * d).sort(dim=1, descending=True).values


def _dense_jobs(plan: _Plan, g: int, idx_g: Tensor) -> None:
    r"""Dense route: :math:`D_i^{1/2}(H_i + \mathrm{diag}(s))D_i^{1/2}`, p × p per node."""
    factor, sd, p = plan.factor, plan.sd, plan.factor.p
    for idx in plan.split(idx_g):

        def build(idx=idx, g=g) -> Tensor:
            sdi = None if sd is None else sd[idx]
            F, W = _operands(factor, g, idx, sdi)
            H = _dense(F, W).to(torch.float64)
            if plan.shifted:
                dd = (
                    sdi.to(torch.float64) ** 2
                    if sdi is not None
                    else torch.ones(len(idx), p, dtype=torch.float64, device=factor.device)
                )
                H = H + torch.diag_embed(plan.shift * dd)
            return H

        plan.add(idx, build, p)


def _psd_gram_jobs(plan: _Plan, g: int, idx_g: Tensor) -> None:
    r"""Diagonal W ⪰ 0: :math:`\mathrm{eig}(A^\top W A) = \mathrm{eig}(W^{1/2} A A^\top W^{1/2})` on the
    samples with w ≠ 0 only; buckets of nodes with similar live counts, each padded to its maximum."""
    factor, sd, solve = plan.factor, plan.sd, plan.solve
    X0 = factor.X[g][:, 0, :]
    Gm = _shared_gram(factor, g, X0, sqrt=False, dtype=solve) if sd is None else None
    e_g = factor.e[idx_g]
    live = _live_first(e_g != 0)
    counts = (e_g != 0).sum(1).tolist()
    sw = e_g.to(solve).sqrt().gather(1, live)
    # whole SIMD groups where the kernel solves them; LAPACK pays for padding
    lanes = _LANES if solve == torch.float32 and eigen.kernel_available() else 1
    for b0, b1 in _buckets(counts, lanes):
        idx = idx_g[b0:b1]
        k = max(1, int(max(counts[b0:b1])))

        def build(idx=idx, k=k, Gm=Gm, X0=X0, o=live[b0:b1, :k], swk=sw[b0:b1, :k]) -> Tensor:
            n = len(idx)
            if Gm is not None:  # rows by index_select, columns by gather (fast)
                Gk = Gm.index_select(0, o.reshape(-1)).view(n, k, -1)
                Gk = Gk.gather(2, o[:, None, :].expand(-1, k, -1))
            else:
                Fk = X0[o] * sd[idx][:, None, :]
                Gk = (Fk @ Fk.mT).to(solve)
            return Gk.mul_(swk[:, :, None]).mul_(swk[:, None, :])

        plan.add(idx, build, k)


def _gram_jobs(plan: _Plan, g: int, idx_g: Tensor) -> None:
    r"""W = I (``"sqrt"`` form): :math:`F_i F_i^\top`, R × R per node."""
    factor, sd = plan.factor, plan.sd
    for idx in plan.split(idx_g):

        def build(idx=idx, g=g) -> Tensor:
            F, _ = _operands(factor, g, idx, None if sd is None else sd[idx])
            return (F @ F.mT).to(torch.float64)

        plan.add(idx, build, factor.rank_bound)


def _sqrt_gram_jobs(plan: _Plan, g: int, idx_g: Tensor) -> None:
    r"""Indefinite diagonal or block W: :math:`\mathrm{eig}(R W R)`, :math:`R = (F F^\top)^{1/2}`
    (shared by the group's nodes when F is)."""
    factor, sd = plan.factor, plan.sd
    shared = sd is None
    if shared:
        F0, _ = _operands(factor, g, idx_g[:1], None)
        Rm = _shared_gram(factor, g, F0, sqrt=True)
    for idx in plan.split(idx_g):

        def build(idx=idx, g=g, Rs=Rm if shared else None) -> Tensor:
            F, (wk, w) = _operands(factor, g, idx, None if sd is None else sd[idx])
            R_ = Rs if Rs is not None else _psd_sqrt(F @ F.mT)
            w = w.to(torch.float64)
            if wk == "diag":
                return (R_ * w[:, None, :]) @ R_
            return R_ @ _blockdiag(w) @ R_

        plan.add(idx, build, factor.rank_bound)


def _spectra(factor: LayerFactor, precond: Tensor | None, shift: float | Tensor, max_tile_bytes: int) -> Tensor:
    r"""Eigenvalues ``(N, r')`` of :math:`D_i^{1/2}(H_i + \mathrm{diag}(s))D_i^{1/2}` (D = I if no precond)."""
    out, jobs = _jobs(factor, precond, shift, max_tile_bytes)
    _run_jobs(jobs)
    return out


def node_hessian_extremes(eigvals: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """``(hess_max, hess_min)`` per node: the largest and smallest eigenvalue of :math:`H_i`,
    counting the ``p - r`` directions of exactly zero curvature beyond the returned ``r``."""
    ev = eigvals.to(torch.float64)
    n, r = ev.shape
    if r == 0:
        z = torch.zeros(n, dtype=torch.float64)
        return z, z.clone()
    hmax, hmin = ev.amax(dim=1), ev.amin(dim=1)
    if p > r:
        zero = torch.zeros((), dtype=torch.float64)
        hmax = torch.where(hmax < 0, zero, hmax)
        hmin = torch.where(hmin > 0, zero, hmin)
    return hmax, hmin


def preconditioned_eigvals(
    factor: LayerFactor, precond: Tensor, shift: float | Tensor = 0.0, max_tile_bytes: int = 256 * 2**20
) -> Tensor:
    r"""Eigenvalues of :math:`D_i^{1/2} (H_i + \mathrm{diag}(s)) D_i^{1/2}` per node, ``(N, r')``
    float64, sorted descending, with the rank tolerance applied.

    ``precond`` is ``(N, p)``, the positive diagonal :math:`D_i` laid out like ``node_matrix``
    rows (Adam: :math:`1/(\sqrt{\hat v}+\epsilon)`); ``shift`` a scalar or ``(p,)``, one value
    per node coordinate (e.g. a bias whose parameter group has another weight decay). With
    ``shift == 0`` the low-rank form :math:`(F_i D_i^{1/2})^\top W_i (F_i D_i^{1/2})` keeps
    ``r' = r``; otherwise the matrix has full rank and ``r' = p`` (dense p × p per node, tiled).
    """
    precond = precond.reshape(factor.n_nodes, factor.p)
    return _spectra(factor, precond, shift, max_tile_bytes)


def bias_group_eigvals(
    factor: LayerFactor, sign: float, wd: float, bias_wd: float, bias_lr_ratio: float, max_tile_bytes: int = 256 * 2**20
) -> Tensor | None:
    r"""Eigenvalues of :math:`A^{1/2}(sH_i + W)A^{1/2} - \mathrm{wd}\,I` per node, ``(N, r')``
    float64 (the other p − r' are 0), for nodes whose bias steps in another parameter group:
    W = diag(wd, …, wd, wd_b), A = diag(1, …, 1, a) with a = ``bias_lr_ratio``.

    With e the bias coordinate, :math:`\mathrm{wd}\,A + (\mathrm{wd}_b - \mathrm{wd})\,a\,ee^	op =
    \mathrm{wd}\,I + \gamma ee^	op`, :math:`\gamma = \mathrm{wd}(a-1) + (\mathrm{wd}_b-\mathrm{wd})a`, so

    .. math:: A^{1/2}(sH_i + W)A^{1/2} - \mathrm{wd}\,I = G^	op M_i G,\quad
              G = egin{bmatrix}	ilde A A^{1/2}\ e^	op\end{bmatrix},\ M_i = \mathrm{diag}(s\,e_i, \gamma):

    a rank-(B+1) problem of the same Gram form as H_i (2-D Linear layers), instead of a dense
    p × p one per node. None for other factor forms (use :func:`preconditioned_eigvals`)."""
    N, p = factor.n_nodes, factor.p
    gamma = wd * (bias_lr_ratio - 1.0) + (bias_wd - wd) * bias_lr_ratio
    if factor.form == "nan":
        return torch.full((N, 1), math.nan, dtype=torch.float64)
    if factor.form == "zero":  # H_i = 0: only γ e eᵀ is left
        return torch.full((N, 1), gamma, dtype=torch.float64)
    if factor.form != "diag" or factor.groups != 1 or not factor.layer.has_bias:
        return None
    X0 = factor.X[0, :, 0, :]
    Xa = torch.cat([X0[:, :-1], X0[:, -1:] * math.sqrt(bias_lr_ratio)], dim=1)
    unit = X0.new_zeros(1, p)
    unit[0, -1] = 1.0
    e = torch.cat([sign * factor.e, factor.e.new_full((N, 1), gamma)], dim=1)
    aug = LayerFactor(
        factor.layer, "diag", factor.kind, X=torch.cat([Xa, unit])[None, :, None, :], e=e, rank_bound=X0.shape[0] + 1
    )
    aug.method = "gram" if aug.rank_bound < p else "dense"
    return _spectra(aug, None, 0.0, max_tile_bytes)
