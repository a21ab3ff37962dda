r"""Per-layer factors of the node blocks: :class:`LayerFactor`, the capture of layer inputs and
output sensitivities, and the exact / GGN factors of uncoupled samples (see
:mod:`trajscope.curvature.blocks` for the maths)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trajscope.nodes import NodeLayer


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------
@dataclass
class LayerFactor:
    r"""Compact representation of all blocks :math:`H_i` of one layer.

    ``form`` says how the blocks are assembled (X below has shape ``(G, B, T, p)``: groups,
    samples, positions, node parameters; its last column is 1 when the layer has a bias):

    * ``"diag"`` (2-D Linear, GGN or exact): :math:`H_i = \tilde A^\top \mathrm{diag}(e_i)\tilde A`
      with :math:`\tilde A` = ``X[0, :, 0, :]`` (B × p) and ``e`` of shape ``(N, B)``;
      rank bound R = B.
    * ``"sqrt"`` (GGN of conv / Linear with extra dims): :math:`H_i = G_i^\top G_i`,
      :math:`G_i[(c,j),:] = \sum_t \delta_{c,j,i,t}\, X_{g(i),j,t,:}`; R = C·B (C = number of
      non-null loss-Hessian directions). Stored as whichever is smaller: ``delta`` of shape
      ``(C, B, N, T)`` (with X; G_i formed per tile), or ``G`` = all G_i, ``(N, C·B, p)``.
    * ``"block"`` (exact, conv / Linear with extra dims): :math:`H_i = \sum_j X_{g(i),j}^\top
      E_{ij} X_{g(i),j}` with ``E`` of shape ``(N, B, T, T)``; R = B·T.
    * ``"zero"``: the layer does not influence the loss on this batch (all blocks are 0).
    * ``"nan"``: the blocks cannot be computed (non-finite values, or a parameter-route layer
      over its memory bound or through an op without second derivatives); all spectra are NaN.
      (A module called more than once per forward, or whose weight is used outside its call,
      takes the parameter route, :mod:`trajscope.curvature.paramroute`: its blocks cover every use.)

    Node i belongs to group ``g(i) = i // (N / G)`` (conv ``groups``; 1 otherwise).
    ``method`` is the route the spectra take (``"gram"``: R × R problems, ``"dense"``:
    p × p blocks). ``cache`` keeps the per-group Gram matrices and their square roots.
    """

    layer: NodeLayer
    form: str
    kind: str
    X: Tensor | None = None
    e: Tensor | None = None
    delta: Tensor | None = None
    G: Tensor | None = None
    E: Tensor | None = None
    rank_bound: int = 0
    method: str = "dense"
    note: str = ""
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_nodes(self) -> int:
        return self.layer.n_nodes

    @property
    def p(self) -> int:
        return self.layer.node_dim

    @property
    def r(self) -> int:
        """Number of eigenvalues returned per node: ``min(p, rank bound)`` (≥ 1)."""
        if self.form in ("zero", "nan"):
            return 1
        return max(1, min(self.p, self.rank_bound))

    @property
    def groups(self) -> int:
        return 1 if self.X is None else int(self.X.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        for t in (self.X, self.e, self.delta, self.G, self.E):
            if t is not None:
                return t.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """Where the factor's tensors live (the analysis device); spectra come back on the CPU."""
        for t in (self.X, self.e, self.delta, self.G, self.E):
            if t is not None:
                return t.device
        return torch.device("cpu")


@dataclass
class CurvatureResult:
    """Output of :func:`node_curvature`.

    Attributes:
        loss: scalar, :math:`L(\\theta)` on the batch (the loss's own reduction).
        grads: :math:`\\nabla_\\theta L` for every parameter in ``params`` (zeros where unused).
            Node gradients are ``node_matrix(grads, layer)``.
        eigvals: layer name → ``(N, r)`` float64 on the CPU (whatever the analysis device), the
            eigenvalues of each :math:`H_i`, sorted descending, ``r = min(p, rank bound)``;
            values under the rank tolerance are exactly 0.
        factors: layer name → :class:`LayerFactor`.
        kind: ``"ggn"`` or ``"exact"``.
    """

    loss: Tensor
    grads: dict[str, Tensor]
    eigvals: dict[str, Tensor]
    factors: dict[str, LayerFactor]
    kind: str


def _batched_grad(outputs: Tensor, inputs: Sequence[Tensor], grad_outputs: Tensor) -> list[Tensor | None]:
    """``torch.autograd.grad`` with a leading batch of ``grad_outputs`` (vmap over the backward
    pass); falls back to a Python loop where an op has no batching rule."""
    inputs = list(inputs)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            return list(
                torch.autograd.grad(
                    outputs, inputs, grad_outputs, retain_graph=True, is_grads_batched=True, allow_unused=True
                )
            )
    except (RuntimeError, NotImplementedError):
        res = [torch.autograd.grad(outputs, inputs, g, retain_graph=True, allow_unused=True) for g in grad_outputs]
        return [None if res[0][k] is None else torch.stack([r[k] for r in res]) for k in range(len(inputs))]


# --------------------------------------------------------------------------------------------
# capturing layer inputs and output sensitivities
# --------------------------------------------------------------------------------------------
class _Capture:
    """Forward hooks that store each node layer's input and add a zero tensor ``dz`` (a leaf
    that requires grad) to its output, so that ∂L/∂dz = ∂L/∂z for every layer at once."""

    expected = 1  # calls of each layer per forward pass

    def __init__(self, model: nn.Module, layers: Sequence[NodeLayer]):
        self.inputs: dict[str, Tensor] = {}
        self.dz: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {l.name: 0 for l in layers}
        self.handles = []
        for l in layers:
            self.handles.append(model.get_submodule(l.name).register_forward_hook(self._hook(l.name)))

    def _hook(self, name: str):
        def hook(mod, args, out):
            self.calls[name] += 1
            if self.calls[name] > 1 or not args or not isinstance(args[0], Tensor):
                return None
            self.inputs[name] = args[0].detach()
            dz = torch.zeros_like(out, requires_grad=True)
            self.dz[name] = dz
            return out + dz

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _MicroCapture(_Capture):
    """:class:`_Capture` for a forward pass replayed per micro-batch (:mod:`trajscope.replay.trainmode`):
    each layer is called once per micro-batch, in order; the calls' inputs are joined, and call k's
    output gets its rows of one ``dz`` leaf spanning the whole batch."""

    def __init__(self, model: nn.Module, layers: Sequence[NodeLayer], sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.expected = len(self.sizes)
        self._parts: dict[str, list[Tensor]] = {l.name: [] for l in layers}
        super().__init__(model, layers)

    def _hook(self, name: str):
        def hook(mod, args, out):
            k = self.calls[name]
            self.calls[name] += 1
            if (
                k >= self.expected
                or not args
                or not isinstance(args[0], Tensor)
                or not isinstance(out, Tensor)
                or out.dim() == 0
                or out.shape[0] != self.sizes[k]
            ):
                return None
            if k == 0:
                self.dz[name] = out.new_zeros(sum(self.sizes), *out.shape[1:]).requires_grad_(True)
            self._parts[name].append(args[0].detach())
            if k == self.expected - 1:
                self.inputs[name] = torch.cat(self._parts[name])
            start = sum(self.sizes[:k])
            return out + self.dz[name][start : start + self.sizes[k]]

        return hook


def _z_to_bnt(z: Tensor, layer: NodeLayer, lead: int = 0) -> Tensor:
    """Reshape a tensor laid out like the layer output (with ``lead`` extra leading dims) to
    ``(*lead, B, N, T)``."""
    shp = z.shape
    pre, B = shp[:lead], shp[lead]
    if layer.kind == "conv":
        return z.reshape(*pre, B, shp[lead + 1], -1)
    N = shp[-1]
    return z.reshape(*pre, B, -1, N).transpose(-1, -2)


def _bnt_to_z(v: Tensor, layer: NodeLayer, zshape: torch.Size) -> Tensor:
    """Inverse of :func:`_z_to_bnt` for a tensor ``(m, B, N, T)`` → ``(m, *zshape)``."""
    m = v.shape[0]
    if layer.kind == "conv":
        return v.reshape(m, *zshape)
    return v.transpose(-1, -2).reshape(m, *zshape)


def _sqrt_factors(delta: Tensor, X: Tensor) -> Tensor:
    r""":math:`G_i[(c,j),:] = \sum_t \delta_{c,j,i,t} X_{j,t,:}` for ``delta`` (C, B, n, T) and
    X (B, T, p) → ``(n, C·B, p)``."""
    return torch.einsum("cjnt,jtp->ncjp", delta, X).reshape(delta.shape[2], -1, X.shape[-1])


def _all_sqrt_factors(delta: Tensor, X: Tensor) -> Tensor:
    """All G_i of a layer ``(N, c·B, p)`` from ``delta`` (c, B, N, T) and X (G, B, T, p)."""
    Gn, N = X.shape[0], delta.shape[2]
    per = N // Gn
    return torch.cat([_sqrt_factors(delta[:, :, g * per : (g + 1) * per], X[g]) for g in range(Gn)])


def _output_sqrt(f: Tensor, fd: Tensor, gf: Tensor, B: int, C: int) -> Tensor | None:
    r"""Square roots :math:`S_j` (``(B, C, C')``, float64) of the per-sample loss Hessians
    :math:`S_j S_j^\top = \partial^2 L/\partial f_j^2`, without the directions that are null in every
    sample; NaN rows for a sample whose Hessian is not finite; None when L has no curvature in f."""
    # per-sample loss Hessian from C HVPs w.r.t. f (direction: output c in every sample)
    eye = torch.eye(C, dtype=f.dtype, device=f.device).reshape(C, 1, *f.shape[1:]).expand(C, *f.shape).contiguous()
    Hc = _batched_grad(gf, [fd], eye)[0] if gf.requires_grad else None
    if Hc is None:  # loss linear in f: no curvature at all
        return None
    Hs = Hc.reshape(C, B, C).permute(1, 2, 0)  # (B, C, C): [j, c_out, c_dir]
    Hs = 0.5 * (Hs + Hs.mT).to(torch.float64)
    ok = torch.isfinite(Hs).flatten(1).all(1)
    Hs = torch.where(ok[:, None, None], Hs, torch.zeros((), dtype=Hs.dtype))
    # a square root S_j = U_j diag(sqrt(w_j)) (S_j S_j^T = H_j); directions that are null in
    # every sample (e.g. the all-ones direction of softmax cross-entropy) are dropped
    w, U = torch.linalg.eigh(Hs)
    w = w.flip(-1).clamp_min(0)
    U = U.flip(-1)
    wmax = float(w.max()) if w.numel() else 0.0
    live_c = (w > C * torch.finfo(f.dtype).eps * wmax).any(0)
    if wmax == 0 or not bool(live_c.any()):
        if bool(ok.all()):
            return None
        live_c = torch.ones(C, dtype=torch.bool, device=w.device)
    S = (U * w.sqrt().unsqueeze(-2))[:, :, live_c]  # (B, C, C')
    S = torch.where(ok[:, None, None], S, torch.full((), math.nan, dtype=S.dtype))
    return S


def _ggn_deltas(
    f: Tensor,
    fd: Tensor,
    gf: Tensor,
    dzs: list[Tensor],
    B: int,
    C: int,
    act_bytes: int,
    max_tile_bytes: int,
    reducers: list[Callable[[Tensor], Tensor]],
) -> tuple[list[list[Tensor] | None], int]:
    r"""Output sensitivities :math:`\delta^{(c)} = \partial (\sum_j S_j[:,c]\cdot f_j)/\partial z`
    of every layer, for the non-null directions c of the per-sample loss Hessians
    :math:`S_j S_j^\top = \partial^2 L/\partial f_j^2`.

    The directions are processed in chunks (one batched backward pass each, bounded by
    ``max_tile_bytes``); ``reducers[k]`` maps layer k's chunk ``(c, *z.shape)`` to what is kept.
    Returns the kept pieces per layer (``None`` where the layer does not reach the loss) and
    the number C' of directions.

    The per-sample loss Hessians take B·C² numbers and B eigendecompositions of C × C: this
    generic route suits outputs of up to a few hundred values per sample."""
    S = _output_sqrt(f, fd, gf, B, C)
    if S is None:
        return [None] * len(dzs), 0
    n_dir = S.shape[-1]
    chunk = int(max(1, min(n_dir, max_tile_bytes // max(4 * act_bytes, 1))))
    kept: list[list[Tensor] | None] = [[] for _ in dzs]
    for s in range(0, n_dir, chunk):
        dirs = S[:, :, s : s + chunk].permute(2, 0, 1).to(f.dtype).reshape(-1, *f.shape)
        d = _batched_grad(f, dzs, dirs)
        for k in range(len(dzs)):
            if d[k] is None or kept[k] is None:
                kept[k] = None
            else:
                kept[k].append(reducers[k](d[k].detach()))
    return kept, n_dir


def _exact_factor(
    l: NodeLayer, gz: Tensor | None, dz: Tensor, input_2d: bool, X: Tensor, B: int, act_bytes: int, max_tile_bytes: int
) -> LayerFactor:
    r"""Exact :math:`\partial^2 L/\partial z_i^2` of one layer by HVPs of ``gz`` = ∂L/∂z
    (built with its graph) w.r.t. the layer's ``dz``: direction "unit i (at position t) in
    every sample"; cross-sample terms vanish (no batch statistics: else :func:`_coupled_exact_factor`)."""
    if gz is None:
        return LayerFactor(l, "zero", "exact")
    N = l.n_nodes
    two_d = l.kind == "linear" and input_2d
    if not gz.requires_grad:  # L is linear in z: zero curvature
        return LayerFactor(l, "zero", "exact")
    T = _z_to_bnt(dz.detach(), l).shape[-1]
    need = N * B * T * T * dz.element_size()
    if not two_d and need > 16 * max_tile_bytes:
        raise ValueError(
            f"exact curvature of layer {l.name!r} needs its {N}x{B} position blocks of "
            f"{T}x{T} ({need / 2**30:.1f} GiB, over 16 x max_tile_bytes): use kind='ggn', "
            "a smaller batch, or a larger max_tile_bytes"
        )
    n_dirs = N * (1 if two_d else T)
    chunk = int(max(1, min(n_dirs, 1024, max_tile_bytes // max(6 * act_bytes, 1))))
    if two_d:
        e = dz.new_empty(N, B)
        for s in range(0, N, chunk):
            ii = torch.arange(s, min(N, s + chunk), device=dz.device)
            at = torch.arange(len(ii), device=dz.device)
            V = dz.new_zeros(len(ii), B, N)
            V[at, :, ii] = 1
            hv = _batched_grad(gz, [dz], V)[0]
            if hv is None:
                return LayerFactor(l, "zero", "exact")
            e[ii] = hv[at, :, ii].detach()
        return LayerFactor(l, "diag", "exact", X=X, e=e, rank_bound=B)
    E = dz.new_empty(N, B, T, T)
    for s in range(0, n_dirs, chunk):
        k = torch.arange(s, min(n_dirs, s + chunk), device=dz.device)
        at = torch.arange(len(k), device=dz.device)
        ii, tt = k // T, k % T
        V = dz.new_zeros(len(k), B, N, T)
        V[at, :, ii, tt] = 1
        hv = _batched_grad(gz, [dz], _bnt_to_z(V, l, dz.shape))[0]
        if hv is None:
            return LayerFactor(l, "zero", "exact")
        hv = _z_to_bnt(hv.detach(), l, lead=1)  # (m, B, N, T): [k, j, i', s]
        E[ii, :, :, tt] = hv[at, :, ii, :]
    return LayerFactor(l, "block", "exact", X=X, E=E, rank_bound=B * T)
