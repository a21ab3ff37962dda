"""Loss, gradients and the spectrum of every node block on one batch (docs/spec.md §4; the maths is in
:mod:`trajscope.curvature.blocks`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from trajscope.curvature.coupled import _coupled_factors
from trajscope.curvature.factors import (
    CurvatureResult,
    LayerFactor,
    _all_sqrt_factors,
    _Capture,
    _exact_factor,
    _ggn_deltas,
    _MicroCapture,
    _z_to_bnt,
)
from trajscope.curvature.patches import _patches
from trajscope.curvature.spectra import _jobs, _run_jobs
from trajscope.nodes import NodeLayer, node_matrix
from trajscope.replay.problem import Problem

__all__ = ["CurvatureResult", "node_curvature", "node_gradients", "twice_differentiable_attention"]


def twice_differentiable_attention():
    """Scaled dot-product attention on its math backend (the same function, composed of
    differentiable ops): the fused CPU/GPU kernels have no derivative of their backward, which
    Hessian-vector products (exact blocks) and Jacobian-vector products by double backward (the
    parameter route) need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def node_curvature(
    problem: Problem,
    layers: Sequence[NodeLayer],
    kind: str = "ggn",
    method: str = "auto",
    max_tile_bytes: int = 256 * 2**20,
) -> CurvatureResult:
    r"""Loss, all gradients, and the spectrum of every node block :math:`H_i` of ``layers``.

    Args:
        problem: the batch's loss :math:`L(\theta)` (:class:`~trajscope.replay.problem.Problem`;
            evaluated functionally, in eval mode, or as training did where it has a ``replay``:
            when a BatchNorm normalises with batch statistics the samples are coupled and the
            blocks take the coupled route, :func:`~trajscope.curvature.coupled._coupled_factors`).
            The loss must be a sum or mean of per-sample terms over the batch (dim 0 of the model
            output, which must be a tensor); the analysis dtype is that of the parameters.
        layers: the node layers (:func:`~trajscope.nodes.find_node_layers`).
        kind: ``"ggn"`` (:math:`\sum_j J_{ij}^\top \partial^2_f L\, J_{ij}`, ⪰ 0) or ``"exact"``
            (:math:`\nabla^2_{\theta_i} L`, may be indefinite).
        method: ``"auto"`` (Gram when the rank bound is below p), ``"gram"`` or ``"dense"``.
        max_tile_bytes: memory bound for one tile of nodes (and for batched autograd passes).

    Returns:
        :class:`CurvatureResult`. Non-finite parameters or loss give NaN spectra, never an error.
    """
    if kind not in ("ggn", "exact"):
        raise ValueError(f"kind must be 'ggn' or 'exact', not {kind!r}")
    if method not in ("auto", "gram", "dense"):
        raise ValueError(f"method must be 'auto', 'gram' or 'dense', not {method!r}")
    leaves = problem.leaves()
    replay = problem.replay
    coupled = replay is not None and replay.batch_statistics(problem.model)
    # embeddings, attention projections, tied weights: blocks by products w.r.t. the parameter
    param_layers = [l for l in layers if l.route == "param"]
    all_layers, layers = layers, [l for l in layers if l.route != "param"]
    with problem.eval_mode():
        cap = (
            _MicroCapture(problem.model, layers, replay.sizes)
            if replay is not None and replay.sizes
            else _Capture(problem.model, layers)
        )
        try:
            with torch.enable_grad(), twice_differentiable_attention():
                f = problem.forward(leaves)
                if not isinstance(f, Tensor):
                    raise TypeError("node_curvature needs a model whose output is one tensor")
                cap.remove()  # the hooks are only needed during the forward pass
                loss, fd, gf, grads = _loss_and_grads(problem, f, leaves, kind)
                live, bad = _hooked_layers(layers, cap, grads, f.shape[0])
                # a module called several times (a shared layer, an RNN cell), or whose weight is used
                # without calling it: the parameter route's blocks cover every use
                param_layers += [l for l in layers if l.name in bad]
                factors = _hook_factors(
                    kind,
                    method,
                    live,
                    cap,
                    leaves,
                    loss,
                    f,
                    fd,
                    gf,
                    coupled,
                    replay.sizes if coupled else None,
                    max_tile_bytes,
                )
                for l in layers:
                    if l.name in bad:
                        factors[l.name] = LayerFactor(l, "nan", kind, note=bad[l.name])
                    elif l.name not in factors:
                        factors[l.name] = LayerFactor(l, "zero", kind, note="not used by the forward pass")
                if param_layers:
                    from trajscope.curvature.paramroute import param_factors

                    factors.update(param_factors(problem, leaves, param_layers, kind, max_tile_bytes))
        finally:
            cap.remove()
    # all layers' eigenproblems go to the pool together (better load balance than per layer)
    eigvals, jobs = {}, []
    for l in all_layers:
        eigvals[l.name], js = _jobs(factors[l.name], None, 0.0, max_tile_bytes)
        jobs += js
    _run_jobs(jobs)
    return CurvatureResult(loss=loss.detach(), grads=grads, eigvals=eigvals, factors=factors, kind=kind)


def _loss_and_grads(
    problem: Problem,
    f: Tensor,
    leaves: dict[str, Tensor],
    kind: str,
) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
    r"""``(loss, fd, gf, grads)``: the loss, a detached copy ``fd`` of the output f, for GGN
    :math:`g_f = \partial L/\partial f` at ``fd`` with its graph (None for exact), and
    :math:`\nabla_\theta L` for every parameter (zeros where unused). GGN takes the gradient as
    :math:`J^\top g_f` so that the loss's graph in f is built once."""
    diff_names = [k for k in leaves if leaves[k].requires_grad]
    fd = f.detach().requires_grad_(True)
    gf = None
    if kind == "ggn":
        loss = problem.loss(fd)
        gf = torch.autograd.grad(loss, fd, create_graph=True)[0]
        grads_list = torch.autograd.grad(
            f, [leaves[k] for k in diff_names], gf.detach(), retain_graph=True, allow_unused=True
        )
    else:
        loss = problem.loss(f)
        grads_list = torch.autograd.grad(loss, [leaves[k] for k in diff_names], retain_graph=True, allow_unused=True)
    grads = {k: (g.detach() if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(diff_names, grads_list)}
    for k in leaves:
        grads.setdefault(k, torch.zeros_like(leaves[k]))
    return loss, fd, gf, grads


def _hooked_layers(
    layers: Sequence[NodeLayer],
    cap: _Capture,
    grads: Mapping[str, Tensor],
    B: int,
) -> tuple[list[NodeLayer], dict[str, str]]:
    """The layers that can be analysed through their hook, and why each of the others cannot."""
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
    return live, bad


def _hook_factors(
    kind: str,
    method: str,
    live: list[NodeLayer],
    cap: _Capture,
    leaves: Mapping[str, Tensor],
    loss: Tensor,
    f: Tensor,
    fd: Tensor,
    gf: Tensor | None,
    coupled: bool,
    sizes: Sequence[int] | None,
    max_tile_bytes: int,
) -> dict[str, LayerFactor]:
    """The factors of the layers analysed through their hooks (coupled, GGN or exact route)."""
    factors: dict[str, LayerFactor] = {}
    finite_params = all(bool(torch.isfinite(v).all()) for v in leaves.values() if v.requires_grad)
    if not (finite_params and bool(torch.isfinite(loss).all())):  # a diverged checkpoint is data: NaN spectra
        return {l.name: LayerFactor(l, "nan", kind, note="non-finite loss or parameters") for l in live}
    dzs = [cap.dz[l.name] for l in live]
    if not dzs:
        return factors
    B, C = f.shape[0], f[0].numel()
    act_bytes = sum(dz.numel() for dz in dzs) * dzs[0].element_size()
    Xs = [_patches(cap.inputs[l.name], l) for l in live]
    if coupled:  # batch statistics: blocks with cross-sample terms
        return _coupled_factors(kind, live, dzs, Xs, loss, f, fd, gf, B, C, act_bytes, max_tile_bytes, method, sizes)
    if kind == "ggn":
        facs = _ggn_factors(live, Xs, dzs, cap, f, fd, gf, B, C, act_bytes, max_tile_bytes)
    else:  # ∂L/∂z of every layer, with its graph, for the HVPs w.r.t. z
        gzs = torch.autograd.grad(loss, dzs, create_graph=True, allow_unused=True)
        facs = [
            _exact_factor(l, gz, dz, cap.inputs[l.name].dim() == 2, X, B, act_bytes, max_tile_bytes)
            for l, gz, dz, X in zip(live, gzs, dzs, Xs)
        ]
    for l, fac in zip(live, facs):
        if fac.form not in ("zero", "nan"):
            fac.method = method if method != "auto" else ("gram" if fac.rank_bound < fac.p else "dense")
        factors[l.name] = fac
    return factors


def _ggn_factors(
    live: list[NodeLayer],
    Xs: list[Tensor],
    dzs: list[Tensor],
    cap: _Capture,
    f: Tensor,
    fd: Tensor,
    gf: Tensor,
    B: int,
    C: int,
    act_bytes: int,
    max_tile_bytes: int,
) -> list[LayerFactor]:
    """GGN factors of uncoupled samples: each chunk of output directions is reduced as it comes
    (bounded memory): 2-D Linear keeps e = Σ_c δ², conv / 3-D Linear the smaller of δ and all G_i."""
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
    facs = []
    for l, X, part, form in zip(live, Xs, parts, forms):
        if part is None:
            facs.append(LayerFactor(l, "zero", "ggn"))
        elif form == "e":
            facs.append(LayerFactor(l, "diag", "ggn", X=X, e=sum(part).T.contiguous(), rank_bound=B))
        elif form == "G":
            facs.append(LayerFactor(l, "sqrt", "ggn", X=X, G=torch.cat(part, dim=1), rank_bound=n_dir * B))
        else:
            facs.append(LayerFactor(l, "sqrt", "ggn", X=X, delta=torch.cat(part), rank_bound=n_dir * B))
    return facs


def node_gradients(grads: Mapping[str, Tensor], layer: NodeLayer) -> Tensor:
    """Per-node gradients ``(N, p)``: rows of ``node_matrix(grads, layer)``."""
    return node_matrix(grads, layer)
