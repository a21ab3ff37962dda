r"""Node blocks by products w.r.t. the parameter itself: the route of the irregular node layers.

Embedding rows, the rows of ``nn.MultiheadAttention``'s packed ``in_proj_weight`` and of its
``out_proj`` (used by the functional kernel, not through a module call), tied weights (one
parameter used by several modules) and modules called more than once per forward pass (a shared
layer, an RNN cell; found at analysis time) do not reach the loss through one hooked pre-activation, so
the hook route's :math:`X^\top E X` form does not apply. Here the block of node i is read off
curvature-vector products with the unit directions of its own coordinates:

.. math:: (H_i)_{:,k} = \big[\mathcal{H}\, e_{i,k}\big]_{\theta_i},

where :math:`\mathcal{H}` is the exact Hessian :math:`\nabla^2_\theta L` (``kind="exact"``: a
Hessian-vector product, double backward) or the GGN :math:`J^\top (\partial^2 L/\partial f^2) J`
(``kind="ggn"``: :math:`Jv` by the double-backward trick, then the output Hessian, then
:math:`J^\top`), of the whole batch w.r.t. the layer's weight (and bias). Every use of the
parameter, and for a tied one every module that shares it, is in the product, so the block
covers them all. Embedding rows: the block of row r is :math:`\partial^2 L / \partial E_r^2`,
summed over the positions where token r occurs (zero when it does not occur).

Cost per layer (N nodes of p coordinates): N·p products, each one (exact) or three (GGN)
backward passes through the model, batched ``m`` at a time with
``m · (|f| + |θ|) · 8 bytes ≤ max_tile_bytes`` (|f| the model output, |θ| the parameters) and
``m ≤ 256``; memory N·p² for the blocks, refused (NaN for the layer, a warning) above
``16 · max_tile_bytes``. Exact and simple, not fast: meant for the embedding tables and attention
projections of small models. The blocks are stored as dense ``"block"`` factors
(:math:`H_i = I\,E_i\,I`), so every spectrum of :mod:`trajscope.curvature.blocks` applies.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from trajscope.curvature.factors import LayerFactor, _batched_grad
from trajscope.nodes import NodeLayer, node_to_params
from trajscope.replay.problem import Problem

__all__ = ["param_factors"]

_MAX_CHUNK = 256


def param_factors(
    problem: Problem, leaves: Mapping[str, Tensor], layers: Sequence[NodeLayer], kind: str, max_tile_bytes: int
) -> dict[str, LayerFactor]:
    """The factors of ``layers`` (all ``route="param"``) on the batch; ``problem.forward(leaves)``
    gives the model output with a graph to ``leaves``, the parameters (requiring grad, the analysis
    dtype), replayed as the hook route's is (train-mode layers, micro-batches). A layer that cannot
    be analysed gets a ``"nan"`` factor and a warning; it never raises."""
    out: dict[str, LayerFactor] = {}
    if not layers:
        return out
    f = problem.forward(leaves)
    theta_bytes = sum(t.numel() for t in leaves.values() if t.is_floating_point()) * f.element_size()
    chunk = int(max(1, min(_MAX_CHUNK, max_tile_bytes // max((f.numel() * f.element_size() + theta_bytes), 1))))
    if kind == "exact":
        loss = problem.loss(f)
    else:
        fd = f.detach().requires_grad_(True)
        loss = problem.loss(fd)
        gf = torch.autograd.grad(loss, fd, create_graph=True)[0]
    if not bool(torch.isfinite(loss)):  # a diverged checkpoint is data: NaN spectra, as on the hook route
        return {l.name: LayerFactor(l, "nan", kind, note="non-finite loss or parameters") for l in layers}
    for l in layers:
        try:
            need = l.n_nodes * l.node_dim**2 * f.element_size()
            if need > 16 * max_tile_bytes:
                raise MemoryError(
                    f"its {l.n_nodes} blocks of {l.node_dim}x{l.node_dim} need {need / 2**30:.1f} GiB "
                    f"(over 16 x max_tile_bytes)"
                )
            ps = [leaves[l.weight]] + ([leaves[l.bias]] if l.bias else [])
            if kind == "exact":
                product = _hvp(loss, ps)
            else:
                product = _ggn_vp(f, fd, gf, ps)
            out[l.name] = _factor(l, kind, product, tuple(leaves[l.weight].shape), chunk, f)
        except (RuntimeError, ValueError, MemoryError, NotImplementedError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(
                f"trajscope: no curvature for node layer {l.name!r}: {msg}; its node spectra are NaN",
                RuntimeWarning,
                stacklevel=3,
            )
            out[l.name] = LayerFactor(l, "nan", kind, note=msg)
    return out


def _flat(ts: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(ts, like)])


def _hvp(loss: Tensor, ps: list[Tensor]) -> Callable[[Tensor], list[Tensor | None]]:
    """``V (m, |ps|) -> H V`` for the exact Hessian w.r.t. ``ps`` (one batched double backward)."""
    g = _flat(torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True), ps)
    if not g.requires_grad:  # the loss is linear in ps
        return lambda V: [None] * len(ps)
    return lambda V: _batched_grad(g, ps, V)


def _ggn_vp(f: Tensor, fd: Tensor, gf: Tensor, ps: list[Tensor]) -> Callable[[Tensor], list[Tensor | None]]:
    r"""``V -> J^T (∂²L/∂f²) J V`` w.r.t. ``ps``: J V by the double-backward trick (:math:`J^\top u` is
    linear in a dummy u; its derivative w.r.t. u along V is J V), the output Hessian by a
    product of ``gf`` = ∂L/∂f (built with its graph), then :math:`J^\top` by a backward pass."""
    u = torch.zeros_like(f, requires_grad=True)
    jtu = torch.autograd.grad(f, ps, u, create_graph=True, allow_unused=True)
    if all(t is None for t in jtu) or not gf.requires_grad:
        return lambda V: [None] * len(ps)
    jtu_flat = _flat(jtu, ps)

    def product(V: Tensor) -> list[Tensor | None]:
        jv = _batched_grad(jtu_flat, [u], V)[0]
        if jv is None:
            return [None] * len(ps)
        hjv = _batched_grad(gf, [fd], jv.detach())[0]
        if hjv is None:
            return [None] * len(ps)
        return _batched_grad(f, ps, hjv.detach())

    return product


def _factor(
    l: NodeLayer,
    kind: str,
    product: Callable[[Tensor], list[Tensor | None]],
    wshape: tuple[int, ...],
    chunk: int,
    like: Tensor,
) -> LayerFactor:
    """Dense blocks ``(N, p, p)`` from products with the unit directions ``e_{i,k}``, ``chunk`` at a time."""
    N, p = l.n_nodes, l.node_dim
    H = like.new_zeros(N, p, p)
    dirs = N * p
    zero = True
    for s in range(0, dirs, chunk):
        k = torch.arange(s, min(dirs, s + chunk), device=like.device)
        at = torch.arange(len(k), device=like.device)
        ii, cc = k // p, k % p
        R = like.new_zeros(len(k), N, p)
        R[at, ii, cc] = 1
        parts = node_to_params(R, l, wshape)
        V = torch.cat(
            [parts[l.weight].reshape(len(k), -1)] + ([parts[l.bias].reshape(len(k), -1)] if l.bias else []), dim=1
        )
        res = product(V)
        if all(r is None for r in res):
            continue
        zero = False
        w = res[0] if res[0] is not None else like.new_zeros(len(k), *wshape)
        rows = (w.transpose(1, 2) if l.transposed else w).reshape(len(k), N, -1)[at, ii]  # (m, fan_in)
        if l.bias:
            b = res[1] if res[1] is not None else like.new_zeros(len(k), N)
            rows = torch.cat([rows, b.reshape(len(k), N)[at, ii, None]], dim=1)
        H[ii, :, cc] = rows.detach()
    if zero:
        return LayerFactor(l, "zero", kind, note="the layer does not reach the loss on this batch")
    H = 0.5 * (H + H.mT)  # the products' rounding: symmetric blocks for the eigensolvers
    if not bool(torch.isfinite(H).all()):
        return LayerFactor(l, "nan", kind, note="non-finite curvature products")
    eye = torch.eye(p, dtype=H.dtype, device=H.device)[None, None]
    return LayerFactor(l, "block", kind, X=eye, E=H[:, None], rank_bound=p, method="dense")
