r"""The analysis of one node layer at one checkpoint: kinematics, node curvature extremes, the update
map's spectrum, the motion along which the excited preset judges a node, and the labels.

All rows are :func:`~trajscope.nodes.node_matrix` rows, :math:`\theta_i = [\mathrm{vec}(W_i);\ b_i]`
(N nodes × p); per-node work runs on the CPU whatever the analysis device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from trajscope.curvature.node import CurvatureResult
from trajscope.curvature.spectra import bias_group_eigvals, node_hessian_extremes, preconditioned_eigvals
from trajscope.dynamics.kinematics import node_kinematics
from trajscope.dynamics.labels import LabelConfig, classify, collapse_reference_norm
from trajscope.dynamics.motion import map_scale, motion_curvature, motion_fractions, motion_from_eigs
from trajscope.dynamics.optimizers import NodeMap, UpdateRule
from trajscope.dynamics.updatemap import NodeSpectra, node_update_spectra
from trajscope.nodes import NodeLayer

NOT_COMPUTED = 255  # label code written when a run has no batches (kinematics only)


@dataclass
class LayerInputs:
    """What the analysis of one node layer at one checkpoint reads.

    ``theta`` / ``theta_next``: θ_t and θ_{t+k} rows (CPU; ``theta_next`` None without a successor), ``k``
    the steps between them (1 without one); ``nmap`` the layer's update map (None: kinematics only);
    ``cr`` the checkpoint's curvature (None: not computed); ``grads`` / ``precond``: the rows of ∇L and
    of the optimizer's frozen preconditioner D on the analysis device (``precond`` only where the rule is
    preconditioned) and ``precond_cpu`` those of D on the CPU; ``loss`` the checkpoint's loss;
    ``first_norm`` the collapse reference (None: this checkpoint); ``clip`` the step's clip factor c_t;
    ``move`` the node's motion u (N, p) and its loss share over an equal share (:func:`node_motion`).
    """

    layer: NodeLayer
    theta: Tensor
    theta_next: Tensor | None
    k: int
    nmap: NodeMap | None
    cr: CurvatureResult | None
    grads: Tensor | None
    precond: Tensor | None
    precond_cpu: Tensor | None
    loss: float
    first_norm: Tensor | None
    clip: float = 1.0
    move: tuple[Tensor, Tensor] | None = None


def node_motion(inp: LayerInputs) -> tuple[Tensor, Tensor]:
    r"""``(u (N, p), s (N,))``: the node's motion (labels.py) and the first-order loss decrease it
    accounts for, :math:`s_i = -g_i^\top u_i` (float64, CPU).

    u is θ_{t+k} − θ_t, or the step direction :math:`-s\,(DA)\,g_i` for a node that did not move or
    without a successor.
    """
    nm = inp.nmap
    theta = inp.theta.to(torch.float64)
    g = inp.grads.cpu().to(torch.float64)
    d = map_scale(nm, inp.precond_cpu if nm.rule.preconditioned else None, g)
    step = -nm.sign * d * g
    u = inp.theta_next.to(torch.float64) - theta if inp.theta_next is not None else step
    u = torch.where((u != 0).any(dim=1, keepdim=True), u, step)
    return u, -(g * u).sum(dim=1)


def equal_share(shares: Sequence[Tensor]) -> float:
    """An equal share of the step's first-order loss decrease: Σ_j |s_j| / N over every node of
    every layer (inf when there is none, so that shares divided by it are 0)."""
    n = sum(int(s.numel()) for s in shares)
    tot = sum(float(torch.nansum(s.abs())) for s in shares)
    return tot / n if n and tot > 0 else math.inf


def map_eigvals(inp: LayerInputs) -> tuple[Tensor, UpdateRule]:
    r"""The curvature eigenvalues (N, m) the layer's update map sees, and the rule to apply to them.

    A clipped step (c = ``clip`` < 1) maps with c·H. Where the map is transformed (Adam's D, a bias
    in another group): the eigenvalues of :math:`(DA)^{1/2}(s\,cH_i + \mathrm{shift})(DA)^{1/2}`, which
    are c × those of :math:`(DA)^{1/2}(s\,H_i + \mathrm{shift}/c)(DA)^{1/2}`; s = −1 when maximising.
    """
    nm, clip, cr = inp.nmap, inp.clip, inp.cr
    n, p = inp.layer.n_nodes, inp.layer.node_dim
    eig, rule = cr.eigvals[inp.layer.name], nm.rule
    if nm.transformed:
        factor = cr.factors[inp.layer.name]
        fast = None
        if nm.lr_scale is not None and not rule.preconditioned:  # a bias in another SGD group
            w = torch.as_tensor(nm.shift, dtype=torch.float64).reshape(-1)
            fast = bias_group_eigvals(factor, nm.sign, float(w[0]) / clip, float(w[-1]) / clip, float(nm.lr_scale[-1]))
        if fast is not None:  # the eigenvalues less wd: the rule adds wd to all p of them
            return clip * fast, replace(rule, weight_decay=float(w[0]))
        dm = map_scale(nm, inp.precond if rule.preconditioned else None, torch.empty(n, p, dtype=torch.float64))
        shift = nm.shift / clip
        eig = clip * (
            preconditioned_eigvals(factor, dm, shift=shift)
            if nm.sign > 0
            else -preconditioned_eigvals(factor, dm, shift=-shift).flip(1)
        )
    elif clip != 1.0:
        eig = clip * eig  # λ' = s·c·λ + wd: decay is added after clipping
    return eig, rule


def _spectra(
    inp: LayerInputs, delta: float, fractions: bool, out: dict[str, np.ndarray]
) -> tuple[Tensor, Tensor, Tensor, NodeSpectra, tuple[Tensor, Tensor, Tensor] | None]:
    """``(hess_max, hess_min, grad_norm, spectra, motion)`` of the layer; NaN (and no motion) without
    curvature. ``fractions``: also the motion fractions, into ``out``."""
    nm, cr, n, p = inp.nmap, inp.cr, inp.layer.n_nodes, inp.layer.node_dim
    if cr is None:
        fill = torch.full((n,), float("nan"), dtype=torch.float64)
        return (
            fill,
            fill,
            fill,
            node_update_spectra(torch.full((n, 1), float("nan"), dtype=torch.float64), p, nm.rule),
            None,
        )
    eig = cr.eigvals[inp.layer.name]
    hmax, hmin = node_hessian_extremes(eig, p)
    grad_norm = inp.grads.norm(dim=1).cpu()
    eig, rule = map_eigvals(inp)
    spectra = node_update_spectra(eig, p, rule)
    pre, clip, move = inp.precond_cpu if nm.rule.preconditioned else None, inp.clip, inp.move
    motion = (*motion_from_eigs(motion_curvature(cr.factors[inp.layer.name], nm, move[0], pre, clip), nm.rule), move[1])
    if fractions:
        neutral_f, unstable_f = motion_fractions(cr.factors[inp.layer.name], nm, nm.rule, move[0], pre, delta, clip)
        out.update(neutral_fraction=_np32(neutral_f), unstable_fraction=_np32(unstable_f))
    return hmax, hmin, grad_norm, spectra, motion


def analyse_layer(
    inp: LayerInputs, labels: LabelConfig, delta: float, fractions: bool = False
) -> dict[str, np.ndarray]:
    """The node arrays of one layer at one checkpoint (the ``node/`` series of analysis.zarr but the stable label).

    Args:
        inp: the layer's inputs.
        labels: the label rules; ``delta`` their neutral band δ.
        fractions: also the motion fractions (``--fractions``).

    Returns:
        ``{series name: (N,) array}``.
    """
    n = inp.layer.n_nodes
    kin = node_kinematics(inp.theta, inp.theta_next, inp.k)
    nan = np.full(n, np.nan, np.float32)
    out: dict[str, np.ndarray] = {
        "param_norm": _np32(kin["param_norm"]),
        "rho": _np32(kin["rho"]),
        "drift": _np32(kin["drift"]),
    }
    if inp.nmap is None:
        out.update(
            motion_radius=nan,
            loss_share=nan,
            hess_max=nan,
            hess_min=nan,
            spectral_radius=nan,
            grad_norm=nan,
            null_dims=np.zeros(n, np.int32),
            neutral_dims=np.zeros(n, np.int32),
            label=np.full(n, NOT_COMPUTED, np.uint8),
            reason=np.full(n, NOT_COMPUTED, np.uint8),
        )
        return out
    hmax, hmin, grad_norm, spectra, motion = _spectra(inp, delta, fractions, out)
    norms = kin["param_norm"].to(torch.float64)
    ref = collapse_reference_norm(labels, norms, inp.first_norm)
    label, reason, neutral = classify(
        spectra,
        norms,
        ref,
        grad_norm.to(torch.float64),
        hmin.to(torch.float64),
        float(inp.loss),
        labels,
        delta,
        motion=motion,
        hess_max=hmax.to(torch.float64),
    )
    out.update(
        motion_radius=_np32(motion[0]) if motion is not None else nan,
        loss_share=_np32(motion[2]) if motion is not None else nan,
        hess_max=_np32(hmax),
        hess_min=_np32(hmin),
        spectral_radius=_np32(spectra.radius),
        grad_norm=_np32(grad_norm),
        null_dims=spectra.null_dims.cpu().numpy().astype(np.int32),
        neutral_dims=neutral.cpu().numpy().astype(np.int32),
        label=label.cpu().numpy().astype(np.uint8),
        reason=reason.cpu().numpy().astype(np.uint8),
    )
    return out


def _np32(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()
