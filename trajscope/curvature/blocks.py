r"""Per-node curvature blocks (GGN or exact), their spectra, and node gradients (docs/spec.md §4).

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

Spectra, their routes, memory bound and parallelism: :mod:`trajscope.curvature.spectra`.

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
from collections.abc import Sequence

import torch
from torch import Tensor

from trajscope.curvature.factors import LayerFactor, _sqrt_factors

__all__ = ["LayerFactor", "block_quadratic_forms", "dense_blocks"]


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
            if factor.form == "sqrt" and factor.G is None:  # y[c,j] = Σ_t δ_{c,j,i,t} (X_{j,t}·u_i)
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
