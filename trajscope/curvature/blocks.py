r"""Per-node curvature blocks (GGN or exact), their spectra, and node gradients (SPEC §4).

For node i of a layer, :math:`H_i = \nabla^2_{\theta_i} L(\theta)` is the Hessian of the loss on
the analysed batch with respect to that node's parameters alone. The node reaches the loss only
through its pre-activations :math:`z_{i} = \theta_i \cdot \tilde x` (a Linear row, or a conv
filter applied at every output position), so every block has the form

.. math::
    H_i = \sum_j X_j^\top E_{ij} X_j ,

where :math:`X_j \in \mathbb{R}^{T \times p}` holds the layer inputs of sample j at its T positions
(rows :math:`\tilde x_{jt} = [x_{jt}; 1]`, unfolded patches for a convolution) and
:math:`E_{ij} = \partial^2 L / \partial z_{ij}\partial z_{ij}^\top \in \mathbb{R}^{T\times T}`
(cross-sample terms vanish for a loss that is a sum or mean over samples). With BatchNorm on batch
statistics (a train-mode replay, :mod:`trajscope.replay.trainmode`) they do not: the blocks are then
:math:`H_i = X^\top M_i X` over all samples and positions of a forward pass, with the cross-sample
second derivatives in :math:`M_i` (exact) or the GGN's per-(sample, output direction) square roots,
see :func:`_coupled_factors`. Models without such layers never take that route.

* **GGN** replaces :math:`\partial^2 L/\partial z^2` by :math:`J^\top (\partial^2 L/\partial f^2) J`.
  With :math:`S_j S_j^\top = \partial^2 L/\partial f_j^2` (computed generically from C
  Hessian-vector products of the loss w.r.t. the output f), one batched backward pass of
  :math:`\sum_j S_j[:,c]\cdot f_j` per output direction c gives
  :math:`\delta^{(c)} = \partial(\cdot)/\partial z` for *every* layer at once, and

  .. math:: H_i^{GGN} = G_i^\top G_i,\qquad G_i[(c,j),:] = \sum_t \delta^{(c)}_{j,i,t}\, \tilde x_{jt}.

  For a Linear layer with 2-D input (T = 1) this is :math:`\tilde A^\top \mathrm{diag}(e_i) \tilde A`
  with :math:`e_{ij} = \sum_c (\delta^{(c)}_{ji})^2`.
* **Exact**: :math:`e_{ij} = \partial^2 L/\partial z_{ij}^2` (2-D Linear: one Hessian-vector
  product w.r.t. z per unit, direction "unit i in every sample"), or the T × T blocks
  :math:`E_{ij}` (conv / Linear with extra dims: one HVP per (unit, position)).

Spectra. With R the rank bound of a block (B, C·B or B·T), ``r = min(p, R)`` eigenvalues are
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

Cost per layer (N nodes, fan-in p, batch B, C outputs, T positions):

=============  =======================================  ===============================
block          autograd                                 linear algebra
=============  =======================================  ===============================
GGN, 2-D lin.  C batched backward passes (all layers)   Gram: N·k³ (k ≤ B live samples)
GGN, conv/3-D  same                                     N·C·B·T·p + N·min(p, CB)³
exact, 2-D     N HVPs w.r.t. z (batched)                as GGN 2-D
exact, conv    N·T HVPs w.r.t. z (batched); memory      N·B·T²·p + N·p³ (dense)
               N·B·T² for the position blocks
coupled exact  N·B·T HVPs (B: largest micro-batch);     N·(BT)²·p + N·p³ or N·(BT)³
               memory N·(BT)²
coupled GGN    B·C backward passes; memory N·B·C·p       N·B·C·p² or N·(BC)³ (Gram)
=============  =======================================  ===============================
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from trajscope.curvature.factors import LayerFactor, _sqrt_factors
from trajscope.linalg import eigen
from trajscope.linalg.eigen import _LANES, _buckets, _eigvalsh, _finalize, _live_first, _psd_sqrt, _solve_dtype
from trajscope.linalg.pool import _pool_map

__all__ = [
    "LayerFactor",
    "node_hessian_extremes",
    "preconditioned_eigvals",
    "bias_group_eigvals",
    "block_quadratic_forms",
    "dense_blocks",
]


# --------------------------------------------------------------------------------------------
# assembling blocks and spectra from a factor
# --------------------------------------------------------------------------------------------
def _node_groups(factor: LayerFactor, idx: Tensor) -> list[tuple[int, Tensor, Tensor]]:
    """Split node indices into (group, positions-in-idx, node-indices) with one group each."""
    G = factor.groups
    if G == 1:
        return [(0, torch.arange(len(idx), device=idx.device), idx)]
    per = factor.n_nodes // G
    g = idx // per
    out = []
    for gg in torch.unique(g).tolist():
        pos = (g == gg).nonzero().flatten()
        out.append((gg, pos, idx[pos]))
    return out


def _operands(factor: LayerFactor, g: int, idx: Tensor, sd: Tensor | None):
    """``(F, W)`` with :math:`H_i = F_i^\\top W_i F_i` for the nodes ``idx`` (all in group g).

    F is ``(R, p)`` shared or ``(n, R, p)`` per node; W is ``("eye", None)``,
    ``("diag", w (n, R))`` or ``("block", E (n, B, T, T))``. ``sd`` (n, p) scales columns
    (:math:`F D^{1/2}`, for preconditioned spectra)."""
    X = factor.X[g]
    if factor.form == "diag":
        F, W = X[:, 0, :], ("diag", factor.e[idx])
    elif factor.form == "sqrt":
        if factor.G is not None:
            F = factor.G[idx]
        else:
            F = _sqrt_factors(factor.delta[:, :, idx], X)
        W = ("eye", None)
    else:  # block
        F, W = X.reshape(-1, X.shape[-1]), ("block", factor.E[idx])
    if sd is not None:
        F = F * sd[:, None, :]
    return F, W




def _dense(F: Tensor, W: tuple) -> Tensor:
    r""":math:`F_i^\top W_i F_i` → ``(n, p, p)`` in F's dtype."""
    kind, w = W
    if kind == "eye":
        return F.mT @ F
    Fn = F if F.dim() == 3 else F.unsqueeze(0)
    if kind == "diag":
        return (Fn.mT * w[:, None, :]) @ Fn
    n, B, T = w.shape[:3]
    Fb = Fn.reshape(Fn.shape[0], B, T, -1)
    Y = w @ Fb  # (n, B, T, p)
    return torch.einsum("njtp,njtq->npq", Fb.expand(n, -1, -1, -1), Y)


def _blockdiag(E: Tensor) -> Tensor:
    """``(n, B, T, T)`` → block-diagonal ``(n, B·T, B·T)``."""
    n, B, T, _ = E.shape
    W = E.new_zeros(n, B, T, B, T)
    j = torch.arange(B, device=E.device)
    W[:, j, :, j, :] = E.transpose(0, 1)
    return W.reshape(n, B * T, B * T)


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


def _shared_gram(factor: LayerFactor, g: int, F: Tensor, sqrt: bool,
                 dtype: torch.dtype = torch.float64) -> Tensor:
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


def _jobs(factor: LayerFactor, precond: Tensor | None, shift: float | Tensor, max_tile_bytes: int,
          ) -> tuple[Tensor, list[_Job]]:
    r"""Output buffer ``(N, r')`` and the jobs that fill it with the eigenvalues of
    :math:`D_i^{1/2}(H_i + \mathrm{diag}(s))D_i^{1/2}` (D = I without ``precond``; s a scalar
    or one value per node coordinate, ``(p,)``).

    Routes: ``dense`` forms the p × p blocks; ``gram`` the R × R matrices with the same
    non-zero spectrum: :math:`FF^\top` (W = I), :math:`W^{1/2}FF^\top W^{1/2}` restricted to
    the samples with :math:`w \ne 0` (diagonal W ⪰ 0), or :math:`(FF^\top)^{1/2} W
    (FF^\top)^{1/2}` (indefinite or block W)."""
    N, p = factor.n_nodes, factor.p
    eps = torch.finfo(factor.dtype).eps
    solve = _solve_dtype(factor.dtype)
    dev = factor.device
    shift = torch.as_tensor(shift, dtype=torch.float64).cpu()
    shifted = bool((shift != 0).any())
    if factor.form in ("zero", "nan"):
        r = p if shifted else 1
        if factor.form == "nan":
            return torch.full((N, r), math.nan, dtype=torch.float64), []
        if not shifted:
            return torch.zeros(N, 1, dtype=torch.float64), []
        d = precond.to("cpu", torch.float64) if precond is not None else torch.ones(N, p, dtype=torch.float64)
        return (shift * d).sort(dim=1, descending=True).values, []
    route = "dense" if shifted else factor.method
    r = p if shifted else factor.r
    out = torch.empty(N, r, dtype=torch.float64)  # spectra are gathered on the CPU
    sd = None if precond is None else precond.to(dev, factor.dtype).clamp_min(0).sqrt()
    shift_dev = shift.to(dev)
    nw = max(1, torch.get_num_threads())
    budget = max(1, max_tile_bytes // nw)  # one tile in flight per worker
    tile = int(max(1, min(N, budget // max(_tile_bytes(factor, route, sd is not None), 1))))
    # 2-D Linear: process nodes in order of their live-sample count (tight Gram buckets)
    order = torch.argsort((factor.e != 0).sum(1), stable=True) if factor.form == "diag" \
        else torch.arange(N, device=dev)
    jobs: list[_Job] = []

    def add(idx: Tensor, build: Callable[[], Tensor], m: int) -> None:
        jobs.append(_Job(idx, build, float(len(idx)) * m ** 3, out, r, p, eps, solve))

    def split(idx: Tensor) -> list[Tensor]:  # enough jobs for every worker
        size = max(4, -(-len(idx) // (2 * nw)))
        return list(idx.split(size))

    with torch.no_grad():
        for s in range(0, N, tile):
            for g, _, idx_g in _node_groups(factor, order[s:s + tile]):
                if route == "dense":
                    for idx in split(idx_g):
                        def build(idx=idx, g=g) -> Tensor:
                            sdi = None if sd is None else sd[idx]
                            F, W = _operands(factor, g, idx, sdi)
                            H = _dense(F, W).to(torch.float64)
                            if shifted:
                                dd = sdi.to(torch.float64) ** 2 if sdi is not None else \
                                    torch.ones(len(idx), p, dtype=torch.float64, device=dev)
                                H = H + torch.diag_embed(shift_dev * dd)
                            return H
                        add(idx, build, p)
                    continue
                kind = "eye" if factor.form == "sqrt" else ("block" if factor.form == "block" else "diag")
                shared = sd is None and kind != "eye"
                if kind == "diag" and bool((factor.e[idx_g] >= 0).all()):
                    # W ⪰ 0: eig(A^T W A) = eig(W^{1/2} A A^T W^{1/2}), only samples with w ≠ 0;
                    # buckets of nodes with similar live counts, each padded to its maximum
                    X0 = factor.X[g][:, 0, :]
                    Gm = _shared_gram(factor, g, X0, sqrt=False, dtype=solve) if shared else None
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
                        add(idx, build, k)
                    continue
                if kind == "eye":
                    for idx in split(idx_g):
                        def build(idx=idx, g=g) -> Tensor:
                            F, _ = _operands(factor, g, idx, None if sd is None else sd[idx])
                            return (F @ F.mT).to(torch.float64)
                        add(idx, build, factor.rank_bound)
                    continue
                # indefinite diagonal or block W: eig(R W R), R = (F F^T)^{1/2}
                if shared:
                    F0, _ = _operands(factor, g, idx_g[:1], None)
                    Rm = _shared_gram(factor, g, F0, sqrt=True)
                for idx in split(idx_g):
                    def build(idx=idx, g=g, Rs=Rm if shared else None) -> Tensor:
                        F, (wk, w) = _operands(factor, g, idx, None if sd is None else sd[idx])
                        R_ = Rs if Rs is not None else _psd_sqrt(F @ F.mT)
                        w = w.to(torch.float64)
                        if wk == "diag":
                            return (R_ * w[:, None, :]) @ R_
                        return R_ @ _blockdiag(w) @ R_
                    add(idx, build, factor.rank_bound)
    return out, jobs


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


def preconditioned_eigvals(factor: LayerFactor, precond: Tensor, shift: float | Tensor = 0.0,
                           max_tile_bytes: int = 256 * 2**20) -> Tensor:
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


def bias_group_eigvals(factor: LayerFactor, sign: float, wd: float, bias_wd: float, bias_lr_ratio: float,
                       max_tile_bytes: int = 256 * 2**20) -> Tensor | None:
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
    aug = LayerFactor(factor.layer, "diag", factor.kind, X=torch.cat([Xa, unit])[None, :, None, :], e=e,
                      rank_bound=X0.shape[0] + 1)
    aug.method = "gram" if aug.rank_bound < p else "dense"
    return _spectra(aug, None, 0.0, max_tile_bytes)


def dense_blocks(factor: LayerFactor, nodes: slice | Sequence[int] | None = None) -> Tensor:
    r"""The dense blocks :math:`H_i` (``(n, p, p)``, analysis dtype) of the selected nodes.

    For tests and debugging: it holds n p² numbers at once."""
    N, p = factor.n_nodes, factor.p
    dev = factor.device
    idx = torch.arange(N, device=dev)
    if nodes is not None:
        idx = idx[nodes] if isinstance(nodes, slice) else torch.as_tensor(list(nodes), dtype=torch.long, device=dev)
    if factor.form == "zero":
        return torch.zeros(len(idx), p, p, dtype=factor.dtype, device=dev)
    if factor.form == "nan":
        return torch.full((len(idx), p, p), math.nan, dtype=factor.dtype, device=dev)
    out = torch.empty(len(idx), p, p, dtype=factor.dtype, device=dev)
    with torch.no_grad():
        for g, pos, ii in _node_groups(factor, idx):
            F, W = _operands(factor, g, ii, None)
            out[pos] = _dense(F, W)
    return out



def block_quadratic_forms(factor: LayerFactor, U: Tensor) -> Tensor:
    r"""Per-node quadratic forms :math:`q_i = u_i^\top H_i u_i` of the blocks with vectors ``U`` (N, p).

    From the factor, without forming a block: with :math:`H_i = F_i^\top W_i F_i`
    (:func:`_operands`), :math:`y_i = F_i u_i` (R values) and :math:`q_i = y_i^\top W_i y_i`.
    ``U`` is cast to the factor's dtype and device; returns ``(N,)`` float64 on the CPU (NaN
    for a ``"nan"`` factor, 0 for ``"zero"``). Cost: one product of U with the layer's
    inputs, O(N·R·p) at most (the ``"sqrt"`` form from ``delta`` never forms G_i).
    """
    N = factor.n_nodes
    if factor.form in ("zero", "nan"):
        return torch.full((N,), 0.0 if factor.form == "zero" else math.nan, dtype=torch.float64)
    U = U.to(dtype=factor.dtype, device=factor.device)
    q = torch.empty(N, dtype=torch.float64)
    idx = torch.arange(N, device=factor.device)
    with torch.no_grad():
        for g, pos, ii in _node_groups(factor, idx):
            u = U[ii]
            X = factor.X[g]
            if factor.form == "sqrt" and factor.G is None:   # y[c,j] = Σ_t δ_{c,j,i,t} (X_{j,t}·u_i)
                Xu = torch.einsum("jtp,np->njt", X, u)
                y = torch.einsum("cjnt,njt->ncj", factor.delta[:, :, ii], Xu)
                qi = (y * y).sum((1, 2))
            else:
                F, (kind, w) = _operands(factor, g, ii, None)
                y = torch.einsum("nrp,np->nr", F, u) if F.dim() == 3 else u @ F.mT
                if kind == "eye":
                    qi = (y * y).sum(1)
                elif kind == "diag":
                    qi = (w * y * y).sum(1)
                else:
                    n, B, T = w.shape[:3]
                    yb = y.reshape(n, B, T)
                    qi = torch.einsum("njt,njts,njs->n", yb, w, yb)
            q[pos.cpu()] = qi.to(torch.float64).cpu()
    return q


# node_curvature and its result moved to trajscope.curvature.node; the old import path keeps working
_MOVED = {"node_curvature", "CurvatureResult", "node_gradients", "twice_differentiable_attention"}


def __getattr__(name: str):
    if name in _MOVED:
        from trajscope.curvature import node
        return getattr(node, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
