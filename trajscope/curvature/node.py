"""Loss, gradients and the spectrum of every node block on one batch (SPEC §4; the maths is in
:mod:`trajscope.curvature.blocks`)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from trajscope.capture import functional_forward
from trajscope.curvature.blocks import _jobs, _run_jobs
from trajscope.curvature.coupled import _coupled_factors
from trajscope.curvature.factors import (CurvatureResult, LayerFactor, _all_sqrt_factors, _Capture, _exact_factor,
                                         _ggn_deltas, _MicroCapture, _z_to_bnt)
from trajscope.curvature.patches import _patches
from trajscope.nodes import NodeLayer, node_matrix

__all__ = ["CurvatureResult", "node_curvature", "node_gradients", "twice_differentiable_attention"]


def twice_differentiable_attention():
    """Scaled dot-product attention on its math backend (the same function, composed of
    differentiable ops): the fused CPU/GPU kernels have no derivative of their backward, which
    Hessian-vector products (exact blocks) and Jacobian-vector products by double backward (the
    parameter route) need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


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


def node_gradients(grads: Mapping[str, Tensor], layer: NodeLayer) -> Tensor:
    """Per-node gradients ``(N, p)``: rows of ``node_matrix(grads, layer)``."""
    return node_matrix(grads, layer)
