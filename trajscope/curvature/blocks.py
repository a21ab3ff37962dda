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
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from trajscope.linalg import eigen
from trajscope.nodes import NodeLayer, node_matrix
from trajscope.replay.functional import functional_forward

__all__ = [
    "LayerFactor",
    "CurvatureResult",
    "node_curvature",
    "node_hessian_extremes",
    "preconditioned_eigvals",
    "bias_group_eigvals",
    "block_quadratic_forms",
    "dense_blocks",
    "node_gradients",
]

# Nodes per eigen-bucket on the Gram route: nodes are sorted by their number of live samples
# and each bucket is padded to its own maximum. Buckets are whole groups of _LANES nodes, the
# eigen kernel's SIMD width (a group costs the same with fewer nodes); a bucket closes when
# the next group would raise its size above _BUCKET_SLACK times its smallest (padding costs
# ~(k_max/k)^2) or it holds _BUCKET nodes.
_BUCKET = 64
_BUCKET_SLACK = 1.05
_LANES = 16


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


# --------------------------------------------------------------------------------------------
# small numerical helpers
# --------------------------------------------------------------------------------------------
_POOL: ThreadPoolExecutor | None = None
_POOL_OK: bool | None = None


def _forget_pool() -> None:  # a forked child inherits the pool object but not its threads
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _single_threaded_worker() -> None:
    """Pool-thread initializer: one OpenMP thread for LAPACK calls made from this thread.

    ``omp_set_num_threads`` sets a per-thread value, so the caller's threads are untouched;
    without it, 2 pool threads × 2 OpenMP threads oversubscribe the cores and batched
    ``eigvalsh`` runs several times *slower* than sequentially."""
    import ctypes
    ctypes.CDLL(None).omp_set_num_threads(1)


def _pool_map(fn: Callable, items: list) -> list:
    """Map over items with a small thread pool of single-threaded LAPACK workers: batched
    eigensolvers on small matrices use about one core, so independent buckets run side by side
    (torch releases the GIL). Sequential where OpenMP's per-thread setting is unavailable."""
    global _POOL, _POOL_OK
    nw = max(1, torch.get_num_threads())
    if _POOL_OK is None:
        try:
            import ctypes
            _POOL_OK = hasattr(ctypes.CDLL(None), "omp_set_num_threads")
        except Exception:
            _POOL_OK = False
    if nw == 1 or len(items) < 2 or not _POOL_OK:
        return [fn(x) for x in items]
    if _POOL is None or _POOL._max_workers != nw:  # noqa: SLF001
        _POOL = ThreadPoolExecutor(max_workers=nw, thread_name_prefix="trajscope-eig",
                                   initializer=_single_threaded_worker)
    return list(_POOL.map(fn, items))


def _eigvalsh(K: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Eigenvalues (float64, on the CPU) of a batch of symmetric matrices ``(n, m, m)`` on any
    device, solved in ``dtype``; NaN for any matrix with non-finite entries (never raises for
    bad data). The spectra are small (n × m) next to the matrices, and everything downstream
    of them (update maps, labels) runs on the CPU."""
    K = K.to(dtype)
    n, m = K.shape[0], K.shape[-1]
    out = torch.full((n, m), math.nan, dtype=torch.float64)
    if n == 0 or m == 0:
        return out
    if bool(torch.isfinite(K.sum())):  # cheap common case (one pass, no mask)
        ok = None
        Kok = K
    else:
        ok = torch.isfinite(K).all(dim=-1).all(dim=-1)
        if not bool(ok.any()):
            return out
        Kok = K[ok]
        ok = ok.cpu()
    try:
        ev = eigen.eigvalsh(Kok).to("cpu", torch.float64)
    except Exception:  # LAPACK non-convergence: retry one by one, NaN what still fails
        import numpy as np
        ev = torch.full((Kok.shape[0], m), math.nan, dtype=torch.float64)
        for i in range(Kok.shape[0]):
            try:
                ev[i] = torch.from_numpy(np.linalg.eigvalsh(Kok[i].cpu().numpy()).astype(np.float64))
            except Exception:
                pass
    if ok is None:
        return ev
    out[ok] = ev
    return out


def _psd_sqrt(M: Tensor) -> Tensor:
    r"""Symmetric square root :math:`U \sqrt{\max(w,0)} U^\top` of symmetric ``(..., m, m)``
    matrices, computed in float64; NaN where the input is not finite."""
    M = M.to(torch.float64)
    M = 0.5 * (M + M.mT)
    bad = ~torch.isfinite(M).flatten(-2).all(-1)
    if bool(bad.any()):
        M = torch.where(bad[..., None, None], torch.zeros((), dtype=M.dtype), M)
    w, U = torch.linalg.eigh(M)
    S = (U * w.clamp_min(0).sqrt().unsqueeze(-2)) @ U.mT
    if bool(bad.any()):
        S = torch.where(bad[..., None, None], torch.full((), math.nan, dtype=S.dtype), S)
    return S


def _finalize(ev: Tensor, r: int, p: int, eps: float) -> Tensor:
    """Pad/trim ascending eigenvalues ``(n, m)`` to ``r`` (keeping the largest |λ|), zero those
    under the rank tolerance ``max(p, r) * eps * 10 * max|λ|``, and sort descending."""
    n, m = ev.shape
    trimmed = m > r
    if trimmed:
        keep = ev.abs().nan_to_num(math.inf).topk(r, dim=1).indices
        ev = ev.gather(1, keep)
    else:
        ev = ev.flip(1)
    amax = ev.abs().amax(dim=1, keepdim=True) if r else ev.new_zeros(n, 1)
    ev = ev.masked_fill(ev.abs() <= max(p, r) * eps * 10.0 * amax, 0.0)
    if m < r:
        ev = torch.cat([ev, ev.new_zeros(n, r - m)], dim=1)
    if trimmed or bool((ev < 0).any()):  # else already descending (the PSD case)
        ev = ev.sort(dim=1, descending=True).values
    return ev


def _batched_grad(outputs: Tensor, inputs: Sequence[Tensor], grad_outputs: Tensor) -> list[Tensor | None]:
    """``torch.autograd.grad`` with a leading batch of ``grad_outputs`` (vmap over the backward
    pass); falls back to a Python loop where an op has no batching rule."""
    inputs = list(inputs)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            return list(torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True,
                                            is_grads_batched=True, allow_unused=True))
    except (RuntimeError, NotImplementedError):
        res = [torch.autograd.grad(outputs, inputs, g, retain_graph=True, allow_unused=True)
               for g in grad_outputs]
        return [None if res[0][k] is None else torch.stack([r[k] for r in res])
                for k in range(len(inputs))]


# --------------------------------------------------------------------------------------------
# capturing layer inputs and output sensitivities
# --------------------------------------------------------------------------------------------
class _Capture:
    """Forward hooks that store each node layer's input and add a zero tensor ``dz`` (a leaf
    that requires grad) to its output, so that ∂L/∂dz = ∂L/∂z for every layer at once."""

    expected = 1     # calls of each layer per forward pass

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
            if k >= self.expected or not args or not isinstance(args[0], Tensor) or not isinstance(out, Tensor) \
                    or out.dim() == 0 or out.shape[0] != self.sizes[k]:
                return None
            if k == 0:
                self.dz[name] = out.new_zeros(sum(self.sizes), *out.shape[1:]).requires_grad_(True)
            self._parts[name].append(args[0].detach())
            if k == self.expected - 1:
                self.inputs[name] = torch.cat(self._parts[name])
            start = sum(self.sizes[:k])
            return out + self.dz[name][start:start + self.sizes[k]]
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


def _patches(x: Tensor, layer: NodeLayer) -> Tensor:
    """Layer input → ``(G, B, T, p)``: the vectors :math:`\\tilde x_{jt}` that row i of
    ``node_matrix`` multiplies (unfolded conv patches, + a ones column for the bias)."""
    B = x.shape[0]
    if layer.kind == "linear":
        X = x.reshape(B, -1, x.shape[-1]).unsqueeze(0)
    else:
        cv = layer.conv
        d = cv["dims"]
        pad = []
        for lo, hi in reversed(cv["pad"]):
            pad += [lo, hi]
        if any(pad):
            mode = cv["padding_mode"]
            x = TF.pad(x, pad, mode="constant" if mode == "zeros" else mode)
        for k in range(d):
            kk, dil, st = cv["kernel_size"][k], cv["dilation"][k], cv["stride"][k]
            x = x.unfold(2 + k, dil * (kk - 1) + 1, st)
            if dil > 1:
                x = x[..., ::dil]
        # x: (B, Cin, *O, *k) -> (G, B, T, Cin_g * prod(k)) in weight[i] C-order
        G = cv["groups"]
        Cin = x.shape[1]
        O = x.shape[2:2 + d]
        x = x.reshape(B, G, Cin // G, *O, *cv["kernel_size"])
        perm = [1, 0] + list(range(3, 3 + d)) + [2] + list(range(3 + d, 3 + 2 * d))
        X = x.permute(*perm).reshape(G, B, math.prod(O), -1)
    if layer.has_bias:
        X = torch.cat([X, X.new_ones(*X.shape[:-1], 1)], dim=-1)
    return X.contiguous()


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


def _sqrt_factors(delta: Tensor, X: Tensor) -> Tensor:
    r""":math:`G_i[(c,j),:] = \sum_t \delta_{c,j,i,t} X_{j,t,:}` for ``delta`` (C, B, n, T) and
    X (B, T, p) → ``(n, C·B, p)``."""
    return torch.einsum("cjnt,jtp->ncjp", delta, X).reshape(delta.shape[2], -1, X.shape[-1])


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


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the eigensolves: float64 for a float64 analysis, else float32. The blocks
    are assembled in the analysis dtype, so their entries already carry its rounding error
    (~p·eps·‖H_i‖); a float32 solve adds ~m·eps·‖H_i‖, well under the rank tolerance of
    :func:`_finalize`, at about 2/3 of the float64 LAPACK time (and 1/4 of it again with the
    kernel of :mod:`trajscope.linalg.eigen`)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run_jobs(jobs: list[_Job]) -> None:
    """Solve all jobs (largest first, on the eigen pool) and scatter the finalized spectra."""
    jobs = sorted(jobs, key=lambda j: -j.cost)

    def solve(j: _Job) -> Tensor:
        return _finalize(_eigvalsh(j.build(), j.solve_dtype), j.r, j.p, j.eps)

    for j, ev in zip(jobs, _pool_map(solve, jobs)):
        j.out[j.idx.cpu()] = ev


def _live_first(mask: Tensor) -> Tensor:
    """Per row of a boolean ``(n, B)`` mask, the column indices with the True ones first (each
    group in column order): a stable partition by cumulative counts, cheaper than a sort."""
    m = mask.to(torch.int64)
    n_live = m.sum(1, keepdim=True)
    pos = torch.where(mask, m.cumsum(1) - 1, n_live + (1 - m).cumsum(1) - 1)
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(pos)
    return torch.empty_like(pos).scatter_(1, pos, cols)


def _buckets(counts: list[int], lanes: int = _LANES) -> list[tuple[int, int]]:
    """Greedy ``[s, t)`` ranges over ascending ``counts``: groups of ``lanes`` (the last one of
    all may be short) merged while ``max <= slack * min + 1`` and the range holds ``_BUCKET``."""
    out, s, n = [], 0, len(counts)
    while s < n:
        t = min(n, s + lanes)
        lim = _BUCKET_SLACK * counts[s] + 1
        while t < n and t - s + lanes <= _BUCKET and counts[min(n, t + lanes) - 1] <= lim:
            t = min(n, t + lanes)
        out.append((s, t))
        s = t
    return out


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


def twice_differentiable_attention():
    """Scaled dot-product attention on its math backend (the same function, composed of
    differentiable ops): the fused CPU/GPU kernels have no derivative of their backward, which
    Hessian-vector products (exact blocks) and Jacobian-vector products by double backward (the
    parameter route) need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def node_curvature(
    model: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], Tensor],
    layers: Sequence[NodeLayer],
    kind: str = "ggn",
    method: str = "auto",
    max_tile_bytes: int = 256 * 2**20,
    replay: Any = None,
) -> CurvatureResult:
    r"""Loss, all gradients, and the spectrum of every node block :math:`H_i` of ``layers``.

    Args:
        model: the module (evaluated functionally, in eval mode; its own tensors are not used).
        params, buffers: tensors keyed like ``model.named_parameters()`` / ``named_buffers()``;
            the analysis dtype is that of the parameters.
        inputs: a tensor → ``model(x)``; tuple → ``model(*x)``; dict → ``model(**x)``.
        targets: second argument of ``loss_fn(output, targets)``.
        loss_fn: a loss that is a sum or mean of per-sample terms over the batch (dim 0 of the
            model output); the model output must be a tensor.
        layers: the node layers (:func:`~trajscope.nodes.find_node_layers`).
        kind: ``"ggn"`` (:math:`\sum_j J_{ij}^\top \partial^2_f L\, J_{ij}`, ⪰ 0) or ``"exact"``
            (:math:`\nabla^2_{\theta_i} L`, may be indefinite).
        method: ``"auto"`` (Gram when the rank bound is below p), ``"gram"`` or ``"dense"``.
        max_tile_bytes: memory bound for one tile of nodes (and for batched autograd passes).
        replay: a :class:`trajscope.replay.trainmode.Replay` (train-mode layers as recorded: one forward
            pass per micro-batch, recorded flags and RNG state); None: one pass in eval mode. When a
            BatchNorm normalises with batch statistics the samples are coupled and the blocks take
            the coupled route (:func:`_coupled_factors`).

    Returns:
        :class:`CurvatureResult`. Non-finite parameters or loss give NaN spectra, never an error.
    """
    if kind not in ("ggn", "exact"):
        raise ValueError(f"kind must be 'ggn' or 'exact', not {kind!r}")
    if method not in ("auto", "gram", "dense"):
        raise ValueError(f"method must be 'auto', 'gram' or 'dense', not {method!r}")
    names = list(params)
    leaves = {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v.detach())
              for k, v in params.items()}
    diff_names = [k for k in names if leaves[k].requires_grad]
    was_training = model.training
    coupled = replay is not None and replay.batch_statistics(model)
    model.eval()
    # embeddings, attention projections, tied weights: blocks by products w.r.t. the parameter
    param_layers = [l for l in layers if l.route == "param"]
    all_layers, layers = layers, [l for l in layers if l.route != "param"]
    cap = _MicroCapture(model, layers, replay.sizes) if replay is not None and replay.sizes else _Capture(model, layers)
    try:
        with torch.enable_grad(), twice_differentiable_attention():
            f = replay.forward(model, leaves, buffers, inputs) if replay is not None else \
                functional_forward(model, {**leaves, **buffers}, inputs)
            if not isinstance(f, Tensor):
                raise TypeError("node_curvature needs a model whose output is one tensor")
            cap.remove()  # the hooks are only needed during the forward pass
            B = f.shape[0]
            C = f[0].numel()
            fd = f.detach().requires_grad_(True)
            if kind == "ggn":
                loss = loss_fn(fd, targets)
                gf = torch.autograd.grad(loss, fd, create_graph=True)[0]
                grads_list = torch.autograd.grad(f, [leaves[k] for k in diff_names], gf.detach(),
                                                 retain_graph=True, allow_unused=True)
            else:
                loss = loss_fn(f, targets)
                grads_list = torch.autograd.grad(loss, [leaves[k] for k in diff_names],
                                                 retain_graph=True, allow_unused=True)
            grads = {k: (g.detach() if g is not None else torch.zeros_like(leaves[k]))
                     for k, g in zip(diff_names, grads_list)}
            for k in names:
                grads.setdefault(k, torch.zeros_like(leaves[k]))

            # which layers can be analysed through their hook
            live: list[NodeLayer] = []
            bad: dict[str, str] = {}
            for l in layers:
                n_calls = cap.calls[l.name]
                if n_calls == 0:
                    used = bool(grads[l.weight].abs().sum() != 0) if l.weight in grads else False
                    if used:
                        bad[l.name] = "its weight is used without calling the module"
                elif n_calls > cap.expected:
                    bad[l.name] = f"the module is called {n_calls / cap.expected:g} times per forward pass"
                elif l.name not in cap.inputs or cap.inputs[l.name].dim() < 2 or cap.inputs[l.name].shape[0] != B:
                    bad[l.name] = "its input's dim 0 is not the batch dimension of the output"
                else:
                    live.append(l)
            # a module called several times (a shared layer, an RNN cell), or whose weight is used
            # without calling it: the parameter route's blocks cover every use
            param_layers += [l for l in layers if l.name in bad]

            factors: dict[str, LayerFactor] = {}
            finite_params = all(bool(torch.isfinite(leaves[k]).all()) for k in diff_names)
            if not (finite_params and bool(torch.isfinite(loss).all())):  # a diverged checkpoint is data: NaN spectra
                for l in live:
                    factors[l.name] = LayerFactor(l, "nan", kind, note="non-finite loss or parameters")
                live = []
            dzs = [cap.dz[l.name] for l in live]
            act_bytes = sum(dz.numel() for dz in dzs) * dzs[0].element_size() if dzs else 1
            Xs = [_patches(cap.inputs[l.name], l) for l in live]
            if coupled and dzs:  # batch statistics: blocks with cross-sample terms; the routes below get nothing
                factors.update(_coupled_factors(kind, live, dzs, Xs, loss, f, fd, gf if kind == "ggn" else None,
                                                B, C, act_bytes, max_tile_bytes, method, replay.sizes))
                live, dzs, Xs = [], [], []
            if kind == "ggn" and dzs:
                # reduce each chunk of output directions as it comes (bounded memory): 2-D
                # Linear keeps e = Σ_c δ², conv / 3-D Linear the smaller of δ and all G_i
                reducers, forms = [], []
                for l, X in zip(live, Xs):
                    G_, _, T_, p_ = X.shape
                    if l.kind == "linear" and cap.inputs[l.name].dim() == 2:
                        reducers.append(lambda d, l=l: (_z_to_bnt(d, l, lead=1)[..., 0] ** 2).sum(0))
                        forms.append("e")
                    elif T_ > p_:
                        reducers.append(lambda d, l=l, X=X: _all_sqrt_factors(_z_to_bnt(d, l, lead=1), X))
                        forms.append("G")
                    else:
                        reducers.append(lambda d, l=l: _z_to_bnt(d, l, lead=1))
                        forms.append("delta")
                parts, n_dir = _ggn_deltas(f, fd, gf, dzs, B, C, act_bytes, max_tile_bytes, reducers)
            elif dzs:  # ∂L/∂z of every layer, with its graph, for the HVPs w.r.t. z
                gzs = torch.autograd.grad(loss, dzs, create_graph=True, allow_unused=True)
            for li, (l, X) in enumerate(zip(live, Xs)):
                if kind == "ggn":
                    if parts[li] is None:
                        factors[l.name] = LayerFactor(l, "zero", kind)
                        continue
                    if forms[li] == "e":
                        fac = LayerFactor(l, "diag", kind, X=X, e=sum(parts[li]).T.contiguous(),
                                          rank_bound=B)
                    elif forms[li] == "G":
                        fac = LayerFactor(l, "sqrt", kind, X=X, G=torch.cat(parts[li], dim=1),
                                          rank_bound=n_dir * B)
                    else:
                        fac = LayerFactor(l, "sqrt", kind, X=X, delta=torch.cat(parts[li]),
                                          rank_bound=n_dir * B)
                else:
                    fac = _exact_factor(l, gzs[li], dzs[li], cap.inputs[l.name].dim() == 2, X, B,
                                        act_bytes, max_tile_bytes)
                if fac.form not in ("zero", "nan"):
                    fac.method = method if method != "auto" else (
                        "gram" if fac.rank_bound < fac.p else "dense")
                factors[l.name] = fac
            for l in layers:
                if l.name in bad:
                    factors[l.name] = LayerFactor(l, "nan", kind, note=bad[l.name])
                elif l.name not in factors:
                    factors[l.name] = LayerFactor(l, "zero", kind, note="not used by the forward pass")
            if param_layers:
                from trajscope.curvature.paramroute import param_factors
                def forward() -> Tensor:
                    return (replay.forward(model, leaves, buffers, inputs) if replay is not None else
                            functional_forward(model, {**leaves, **buffers}, inputs))
                factors.update(param_factors(forward, leaves, targets, loss_fn, param_layers, kind, max_tile_bytes))
    finally:
        cap.remove()
        model.train(was_training)

    # all layers' eigenproblems go to the pool together (better load balance than per layer)
    eigvals, jobs = {}, []
    for l in all_layers:
        eigvals[l.name], js = _jobs(factors[l.name], None, 0.0, max_tile_bytes)
        jobs += js
    _run_jobs(jobs)
    return CurvatureResult(loss=loss.detach(), grads=grads, eigvals=eigvals, factors=factors, kind=kind)


def _all_sqrt_factors(delta: Tensor, X: Tensor) -> Tensor:
    """All G_i of a layer ``(N, c·B, p)`` from ``delta`` (c, B, N, T) and X (G, B, T, p)."""
    Gn, N = X.shape[0], delta.shape[2]
    per = N // Gn
    return torch.cat([_sqrt_factors(delta[:, :, g * per:(g + 1) * per], X[g]) for g in range(Gn)])


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


def _ggn_deltas(f: Tensor, fd: Tensor, gf: Tensor, dzs: list[Tensor], B: int, C: int,
                act_bytes: int, max_tile_bytes: int, reducers: list[Callable[[Tensor], Tensor]],
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
        dirs = S[:, :, s:s + chunk].permute(2, 0, 1).to(f.dtype).reshape(-1, *f.shape)
        d = _batched_grad(f, dzs, dirs)
        for k in range(len(dzs)):
            if d[k] is None or kept[k] is None:
                kept[k] = None
            else:
                kept[k].append(reducers[k](d[k].detach()))
    return kept, n_dir


def _exact_factor(l: NodeLayer, gz: Tensor | None, dz: Tensor, input_2d: bool, X: Tensor, B: int,
                  act_bytes: int, max_tile_bytes: int) -> LayerFactor:
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
            "a smaller batch, or a larger max_tile_bytes")
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


# --------------------------------------------------------------------------------------------
# coupled samples: BatchNorm on batch statistics
# --------------------------------------------------------------------------------------------
def _coupled_factors(kind: str, live: Sequence[NodeLayer], dzs: list[Tensor], Xs: list[Tensor], loss: Tensor,
                     f: Tensor, fd: Tensor, gf: Tensor | None, B: int, C: int, act_bytes: int, max_tile_bytes: int,
                     method: str, sizes: Sequence[int] | None = None) -> dict[str, LayerFactor]:
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
        facs = [_coupled_exact_factor(l, gz, dz, X, B, sizes, act_bytes, max_tile_bytes)
                for l, gz, dz, X in zip(live, gzs, dzs, Xs)]
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


def _coupled_exact_factor(l: NodeLayer, gz: Tensor | None, dz: Tensor, X: Tensor, B: int, sizes: Sequence[int],
                          act_bytes: int, max_tile_bytes: int) -> LayerFactor:
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
            "batch, or a larger max_tile_bytes")
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
            E[ii[sel], o * T:(o + n) * T, (o + u[sel]) * T + tt[sel]] = hv[sel, o:o + n].reshape(-1, n * T)
    E = 0.5 * (E + E.mT)
    Gn, p = X.shape[0], X.shape[-1]
    return LayerFactor(l, "block", "exact", X=X.reshape(Gn, 1, BT, p), E=E.unsqueeze(1), rank_bound=BT)


def _coupled_ggn_factors(live: Sequence[NodeLayer], dzs: list[Tensor], Xs: list[Tensor], f: Tensor, fd: Tensor,
                         gf: Tensor, B: int, C: int, sizes: Sequence[int], act_bytes: int, max_tile_bytes: int,
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
        dirs_all[u, :, o + u, :] = S[o:o + n].permute(0, 2, 1).to(f.dtype)
    dirs_all = dirs_all.reshape(D, *f.shape)
    chunk = int(max(1, min(D, max_tile_bytes // max(4 * act_bytes, 1))))
    parts: list[list[Tensor] | None] = [[] for _ in live]
    for s in range(0, D, chunk):
        d = _batched_grad(f, dzs, dirs_all[s:s + chunk])
        u = torch.arange(s, min(D, s + chunk), device=f.device) // n_c
        for k, (l, X) in enumerate(zip(live, Xs)):
            if d[k] is None or parts[k] is None:
                parts[k] = None
                continue
            delta = _z_to_bnt(d[k].detach(), l, lead=1)  # (m, B, N, T)
            per = l.n_nodes // X.shape[0]
            for o, n in spans:  # rows (j = o + u, c) of G_i: the samples of j's micro-batch
                dm = delta[u < n, o:o + n]
                parts[k].append(torch.cat([torch.einsum("mknt,ktp->nmp", dm[:, :, g * per:(g + 1) * per],
                                                        X[g, o:o + n]) for g in range(X.shape[0])]))
    return [LayerFactor(l, "zero", "ggn") if pk is None else
            LayerFactor(l, "sqrt", "ggn", X=X, G=torch.cat(pk, dim=1), rank_bound=B * n_c)
            for l, X, pk in zip(live, Xs, parts)]


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


def node_gradients(grads: Mapping[str, Tensor], layer: NodeLayer) -> Tensor:
    """Per-node gradients ``(N, p)``: rows of ``node_matrix(grads, layer)``."""
    return node_matrix(grads, layer)


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
