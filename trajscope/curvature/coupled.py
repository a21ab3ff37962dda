"""Node-block factors when the samples of a forward pass are coupled (BatchNorm on batch statistics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trajscope.curvature.factors import LayerFactor, _batched_grad, _bnt_to_z, _output_sqrt, _z_to_bnt
from trajscope.nodes import NodeLayer


def _coupled_factors(
    kind: str,
    live: Sequence[NodeLayer],
    dzs: list[Tensor],
    Xs: list[Tensor],
    loss: Tensor,
    f: Tensor,
    fd: Tensor,
    gf: Tensor | None,
    B: int,
    C: int,
    act_bytes: int,
    max_tile_bytes: int,
    method: str,
    sizes: Sequence[int] | None = None,
) -> dict[str, LayerFactor]:
    r"""Node blocks when the samples of a forward pass are coupled (a BatchNorm normalising with
    batch statistics downstream of a layer makes :math:`\partial^2 L/\partial z_j\partial z_k \ne 0`
    for j ≠ k). With X ``(B·T, p)`` the layer's input rows of all samples and positions:

    * exact: :math:`H_i = X^\top M_i X`, :math:`M_i[(j,s),(k,t)] = \partial^2 L/\partial z_{jis}\partial z_{kit}`,
      one HVP w.r.t. z per (node i, sample k, position t) (:func:`_coupled_exact_factor`); form
      ``"block"`` with one B·T × B·T block per node, rank bound B·T;
    * GGN: :math:`H_i = G_i^\top G_i`, :math:`G_i[(j,c),:] = \sum_{k,t} \delta^{(j,c)}_{k,i,t}\,\tilde x_{kt}`,
      :math:`\delta^{(j,c)} = \partial (S_j[:,c]\cdot f_j)/\partial z`: one backward pass per
      (sample j, output direction c) (:func:`_coupled_ggn_factors`); form ``"sqrt"``, rank bound B·C'.

    ``sizes``: the micro-batches, forward passes of their own (gradient accumulation); samples of
    different ones are not coupled, so one direction serves the same sample index in each of them:
    the number of directions is that of the largest micro-batch. Cost: B·T (exact) or B·C' (GGN)
    times the directions of the uncoupled routes, for one micro-batch."""
    sizes = list(sizes) if sizes else [B]
    if kind == "ggn":
        facs = _coupled_ggn_factors(live, dzs, Xs, f, fd, gf, B, C, sizes, act_bytes, max_tile_bytes)
    else:
        gzs = torch.autograd.grad(loss, dzs, create_graph=True, allow_unused=True)
        facs = [
            _coupled_exact_factor(l, gz, dz, X, B, sizes, act_bytes, max_tile_bytes)
            for l, gz, dz, X in zip(live, gzs, dzs, Xs)
        ]
    out = {}
    for l, fac in zip(live, facs):
        if fac.form not in ("zero", "nan"):
            fac.method = method if method != "auto" else ("gram" if fac.rank_bound < fac.p else "dense")
        out[l.name] = fac
    return out


def _micro_spans(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(first sample, samples) of each micro-batch."""
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    return list(zip(starts, sizes))


def _coupled_exact_factor(
    l: NodeLayer,
    gz: Tensor | None,
    dz: Tensor,
    X: Tensor,
    B: int,
    sizes: Sequence[int],
    act_bytes: int,
    max_tile_bytes: int,
) -> LayerFactor:
    r"""Exact blocks with cross-sample terms: column (k, t) of :math:`M_i` is the HVP of ``gz`` = ∂L/∂z
    w.r.t. ``dz`` in the direction "unit i at sample k, position t"; one HVP holds the u-th sample of
    every micro-batch (their blocks of :math:`M_i` do not overlap)."""
    if gz is None or not gz.requires_grad:  # unused, or L linear in z
        return LayerFactor(l, "zero", "exact")
    N = l.n_nodes
    T = _z_to_bnt(dz.detach(), l).shape[-1]
    BT, U = B * T, max(sizes)
    need = N * BT * BT * dz.element_size()
    if need > 16 * max_tile_bytes:
        raise ValueError(
            f"exact curvature of layer {l.name!r} with batch statistics needs {N} coupled blocks of "
            f"{BT}x{BT} ({need / 2**30:.1f} GiB, over 16 x max_tile_bytes): use kind='ggn', a smaller "
            "batch, or a larger max_tile_bytes"
        )
    spans = _micro_spans(sizes)
    n_dirs = N * U * T
    chunk = int(max(1, min(n_dirs, 1024, max_tile_bytes // max(6 * act_bytes, 1))))
    E = dz.new_zeros(N, BT, BT)
    for s in range(0, n_dirs, chunk):
        k = torch.arange(s, min(n_dirs, s + chunk), device=dz.device)
        at = torch.arange(len(k), device=dz.device)
        ii, u, tt = k // (U * T), (k % (U * T)) // T, k % T
        V = dz.new_zeros(len(k), B, N, T)
        for o, n in spans:
            sel = u < n
            V[at[sel], o + u[sel], ii[sel], tt[sel]] = 1
        hv = _batched_grad(gz, [dz], _bnt_to_z(V, l, dz.shape))[0]
        if hv is None:
            return LayerFactor(l, "zero", "exact")
        hv = _z_to_bnt(hv.detach(), l, lead=1)[at, :, ii, :]  # (m, B, T): row j of column (i, k, t)
        for o, n in spans:
            sel = u < n
            E[ii[sel], o * T : (o + n) * T, (o + u[sel]) * T + tt[sel]] = hv[sel, o : o + n].reshape(-1, n * T)
    E = 0.5 * (E + E.mT)
    Gn, p = X.shape[0], X.shape[-1]
    return LayerFactor(l, "block", "exact", X=X.reshape(Gn, 1, BT, p), E=E.unsqueeze(1), rank_bound=BT)


def _coupled_ggn_factors(
    live: Sequence[NodeLayer],
    dzs: list[Tensor],
    Xs: list[Tensor],
    f: Tensor,
    fd: Tensor,
    gf: Tensor,
    B: int,
    C: int,
    sizes: Sequence[int],
    act_bytes: int,
    max_tile_bytes: int,
) -> list[LayerFactor]:
    r"""GGN blocks with cross-sample terms: all :math:`G_i` ``(N, B·C', p)`` of every layer, from batched
    backward passes of the output-space directions :math:`e_j \otimes S_j[:,c]`; one direction holds
    the u-th sample of every micro-batch (each micro-batch's rows of δ are its own sample's)."""
    S = _output_sqrt(f, fd, gf, B, C)
    if S is None:
        return [LayerFactor(l, "zero", "ggn") for l in live]
    n_c, U, spans = S.shape[-1], max(sizes), _micro_spans(sizes)
    D = U * n_c
    dirs_all = torch.zeros(U, n_c, B, C, dtype=f.dtype, device=f.device)  # [u, c', k, :] = [k = o + u] S_k[:, c']
    for o, n in spans:
        u = torch.arange(n, device=f.device)
        dirs_all[u, :, o + u, :] = S[o : o + n].permute(0, 2, 1).to(f.dtype)
    dirs_all = dirs_all.reshape(D, *f.shape)
    chunk = int(max(1, min(D, max_tile_bytes // max(4 * act_bytes, 1))))
    parts: list[list[Tensor] | None] = [[] for _ in live]
    for s in range(0, D, chunk):
        d = _batched_grad(f, dzs, dirs_all[s : s + chunk])
        u = torch.arange(s, min(D, s + chunk), device=f.device) // n_c
        for k, (l, X) in enumerate(zip(live, Xs)):
            if d[k] is None or parts[k] is None:
                parts[k] = None
                continue
            delta = _z_to_bnt(d[k].detach(), l, lead=1)  # (m, B, N, T)
            per = l.n_nodes // X.shape[0]
            for o, n in spans:  # rows (j = o + u, c) of G_i: the samples of j's micro-batch
                dm = delta[u < n, o : o + n]
                parts[k].append(
                    torch.cat(
                        [
                            torch.einsum("mknt,ktp->nmp", dm[:, :, g * per : (g + 1) * per], X[g, o : o + n])
                            for g in range(X.shape[0])
                        ]
                    )
                )
    return [
        LayerFactor(l, "zero", "ggn")
        if pk is None
        else LayerFactor(l, "sqrt", "ggn", X=X, G=torch.cat(pk, dim=1), rank_bound=B * n_c)
        for l, X, pk in zip(live, Xs, parts)
    ]
