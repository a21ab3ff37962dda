"""Per-node update-map spectra of one optimizer step, and stability thresholds (docs/spec.md §5).

One real optimizer step, linearised at θ_t with the recorded hyperparameters and state
frozen and restricted to one node θ_i (p parameters), is a linear map on the node's
optimizer state. Because every supported rule is a polynomial in one symmetric matrix
(H_i + wd·I, or its preconditioned form), the map splits into independent 1×1 or 2×2
blocks, one per eigen-direction of that matrix, and its eigenvalues μ follow in closed
form from the curvature eigenvalues. With λ' the *effective* curvature of a direction:

=============  =================  ================================================
kind           state per dir.     μ
=============  =================  ================================================
sgd            θ                  μ = 1 − α λ'
sgd_momentum   (θ, buf)           μ² − (1 + β − α(1−d)λ')μ + β = 0
nesterov       (θ, buf)           μ² − (1 + β − α(1 + β(1−d))λ')μ + β(1 − αλ') = 0
adam           (θ, m)             μ² − (1 + β1 − a(1−β1)λ̃)μ + β1 = 0
adamw          (θ, m)             μ² − (c + β1 − a(1−β1)λ̃)μ + β1·c = 0,  c = 1 − α·wd
rmsprop        θ                  μ = 1 − α λ̃
rmsprop_mom.   (θ, buf)           μ² − (1 + β − αλ̃)μ + β = 0
adagrad        θ                  μ = 1 − α_t λ̃,  α_t = α/(1 + step·lr_decay)
gd_fallback    θ                  μ = 1 − α λ
=============  =================  ================================================

λ' = s·λ + wd for the SGD family (s = −1 with ``maximize=True``, else 1); a = α/(1 − β1^t)
with t = step + 1 the step count the update uses. For Adam/AdamW, λ̃ are the eigenvalues
of D^{1/2}(s·H_i + coupled_shift·I)D^{1/2} with D = :func:`~trajscope.dynamics.optimizers.adam_preconditioner` (the
caller forms that block; it already contains the shift). Without a momentum buffer
(the optimizer's first step) the state is θ alone: SGD-with-momentum steps with
μ = 1 − αλ', Nesterov with μ = 1 − α(1+β)λ', Adam/AdamW with μ = c − a(1−β1)λ̃.

Derivations (δθ, δbuf: perturbations; g' = λ'θ is the linearised, decayed gradient):

* heavy ball: buf' = β buf + (1−d)λ'θ, θ' = θ − α buf'. Block
  [[1 − α(1−d)λ', −αβ], [(1−d)λ', β]]: trace 1 + β − α(1−d)λ', det β.
* Nesterov: buf' as above, θ' = θ − α(λ'θ + β buf'). Block
  [[1 − αλ'(1 + β(1−d)), −αβ²], [(1−d)λ', β]]: trace 1 + β − αλ'(1 + β(1−d)),
  det β(1 − αλ'(1 + β(1−d))) + αβ²(1−d)λ' = β(1 − αλ').
* RMSprop / Adagrad with their second moment (hence D) frozen: θ' = θ − α D g' (RMSprop with
  momentum: buf' = β buf + D g', θ' = θ − α buf'). D = 1/(√v_used + ε) with v_used = ρv + (1−ρ)g²
  (centered: minus the squared running mean of g), or for Adagrad the accumulated sum + g². In
  x = D^{-1/2}θ, y = D^{-1/2}buf the momentum block per λ̃ of K = D^{1/2}(s·H + wd)D^{1/2} is
  [[1 − αλ̃, −αβ], [λ̃, β]]: trace 1 + β − αλ̃, det β. Their moments carry μ = ρ (RMSprop) and
  1 (Adagrad's sum) and decouple as Adam's v does.
* Adam/AdamW with v (hence D) frozen: m' = β1 m + (1−β1)g', θ' = cθ − a D m' (AdamW
  decays θ by c before the step; the gradient is taken at the undecayed θ). In the
  coordinates x = D^{-1/2}θ, y = D^{1/2}m the block per eigenvalue λ̃ of
  K = D^{1/2}(H [+ wd])D^{1/2} is [[c − a(1−β1)λ̃, −aβ1], [(1−β1)λ̃, β1]]:
  trace c + β1 − a(1−β1)λ̃, det β1·c. The real step also carries v as state; with v
  frozen its directions have μ = β2 exactly (∂v'/∂v = β2·I), and they decouple when
  the gradient and m are small (the couplings are 2(1−β2)·g·H and m'·∂D/∂v).

A direction the step does not act on ("null") is one whose effective step on θ is exactly
zero (e.g. λ' = 0 under SGD): it contributes μ = 1 exactly and is kept out of ``mu_abs``.
In a 2×2 block such a direction gives μ = 1 (null) and μ = β (SGD family) or β1 (Adam),
the momentum buffer decaying on its own, which *is* acted on. Under AdamW with wd > 0 a
zero-curvature direction gives μ = c < 1: decay acts on it.

A node whose bias sits in another parameter group than its weight row (e.g. no weight decay
on biases) steps with per-coordinate α_k and wd_k. With the other hyperparameters equal,
the same blocks hold on the eigenvalues λ̃ of A^{1/2}(s·H_i + diag(wd_k))A^{1/2}, A =
diag(α_k/α) (times D for Adam), with α the weight group's lr: see :func:`~trajscope.dynamics.optimizers.node_map`.

What else changes the step (:func:`~trajscope.dynamics.stepgrad.step_gradient`). The recorder keeps, per step, ‖g_stepped‖ (the
gradient the optimizer stepped with, at its step pre-hook) and ‖g_backward‖ (as backward accumulated
it). Against the replayed ‖∇L(θ_t)‖ the *step factor* is c_t = ‖g_stepped‖ / ‖∇L‖:

* loss scaling (``torch.amp.GradScaler``): backward's gradient is S × the true one, S a power of two,
  and ``scaler.step`` unscales before the step: ‖g_backward‖/‖∇L‖ = S, c_t = 1. Named, not a mismatch.
* gradient clipping (``clip_grad_norm_``): c_t = max_norm/‖g‖ < 1, the step uses g_stepped = c_t·∇L.
  Linearised with c_t frozen, the map is that of the same rule on the curvature c_t·H_i (SGD family:
  λ' = s·c_t·λ + wd, decay is added after clipping; adaptive kinds: λ̃ of D^{1/2}(s·c_t·H_i + shift)D^{1/2}
  with D formed from c_t·∇L). This ignores the derivative of the clip factor itself: with u = ∇L/‖∇L‖
  the clipped gradient's Jacobian is c_t(I − uuᵀ)H, so freezing c_t drops the rank-one term
  −c_t·uuᵀH (clipping by norm makes the step's length blind to changes of the gradient along itself;
  restricted to a node it couples the node to the others through u). A gradient scaled down by hand
  by the same factor everywhere is indistinguishable from clipping by norm and is treated as one.
* anything else (c_t > 1, or backward's gradient not a power of two times the replayed one) is a
  *gradient-norm mismatch*: the replay does not reproduce the gradient the step used.

The rules themselves (:class:`UpdateRule` from the recorded hyperparameters and state, :class:`NodeMap`,
the preconditioner D) are in :mod:`trajscope.dynamics.optimizers`, the step factor in
:mod:`trajscope.dynamics.stepgrad`; this module holds the maps' spectra and thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from trajscope.dynamics.optimizers import UpdateRule

__all__ = ["NodeSpectra", "node_update_spectra", "update_map_eigenvalues", "stability_threshold"]


@dataclass
class NodeSpectra:
    """|μ| of each node's update map (one row per node).

    ``mu_abs`` (N, M) float64: |μ| of the acted-on directions; row i holds ``acted[i]``
    valid entries first, then NaN padding (M = max acted, possibly 0).
    ``null_dims`` (N,) int32: directions with μ = 1 exactly that the step does not act on.
    ``radius`` (N,) float64: max |μ| over all directions (null ones count as 1).
    ``acted`` (N,) int32: valid entries of ``mu_abs``; acted + null_dims = p (single-state
    maps) or 2p (momentum / Adam maps with a buffer).
    Added beyond the brief: ``p`` (parameters per node) and ``zero_eig_dims`` (N,) int32,
    the number of the p eigenvalues passed in that are exactly 0 (the p − r implicit
    zeros plus explicit ones): the seed preset's σ_min(H) = 0 test uses it (docs/spec.md §7).
    """

    mu_abs: Tensor
    null_dims: Tensor
    radius: Tensor
    acted: Tensor
    p: int = 0
    zero_eig_dims: Tensor | None = None


def _eig_rows(eig: Tensor, p: int) -> Tensor:
    """Curvature eigenvalues as float64 rows ``(N, r)``, r <= p (a 1-D input is one node)."""
    eig = torch.as_tensor(eig).to(torch.float64)
    if eig.dim() == 1:
        eig = eig[None, :]
    if eig.shape[1] > p:
        raise ValueError(f"{eig.shape[1]} eigenvalues for a node of {p} parameters")
    return eig


def _single_state(rule: UpdateRule) -> bool:
    """Maps on θ alone, μ = 1 − coef·λ': GD-like kinds, and momentum kinds before their buffer exists."""
    return rule.kind in ("sgd", "gd_fallback", "rmsprop", "adagrad") or (
        rule.kind in ("sgd_momentum", "nesterov", "rmsprop_momentum") and not rule.has_buffer
    )


def _char_poly(eig: Tensor, p: int, rule: UpdateRule) -> tuple[Tensor, Tensor | None, Tensor, Tensor, float, float]:
    """Per direction (N, p): T and Dt of μ² − Tμ + Dt (Dt None: single-state map μ = T).

    Also returns the mask of directions with zero effective step (x = 0), the full
    eigenvalue tensor (N, p), and the two μ such a direction has (c, other root).
    """
    eig = _eig_rows(eig, p)
    n, r = eig.shape
    lam = torch.zeros((n, p), dtype=torch.float64, device=eig.device)
    lam[:, :r] = eig
    s = rule.curvature_sign
    alpha = float(rule.lr)
    if rule.preconditioned:
        lam_eff = lam  # λ̃ already holds the sign and the coupled shift
    elif rule.kind == "gd_fallback":
        lam_eff = lam
    else:
        lam_eff = s * lam + rule.coupled_shift
    kind = rule.kind
    # RMSprop and Adagrad are GD / heavy ball (d = 0) on λ̃, with Adagrad's decayed step α_t
    if _single_state(rule):
        coef = alpha * (1.0 + rule.momentum) if kind == "nesterov" else rule.step_lr
        x = coef * lam_eff
        return 1.0 - x, None, x == 0, lam, 1.0, 1.0
    if kind in ("sgd_momentum", "rmsprop_momentum"):
        beta, d = float(rule.momentum), float(rule.dampening)
        x = alpha * (1.0 - d) * lam_eff
        return 1.0 + beta - x, torch.full_like(x, beta), x == 0, lam, 1.0, beta
    if kind == "nesterov":
        beta, d = float(rule.momentum), float(rule.dampening)
        x = alpha * lam_eff
        return (1.0 + beta - x * (1.0 + beta * (1.0 - d)), beta * (1.0 - x), x == 0, lam, 1.0, beta)
    # adam / adamw
    b1, c, a = float(rule.beta1), rule.decay_factor, rule.bias_corrected_lr
    x = a * (1.0 - b1) * lam_eff
    if not rule.has_buffer:
        return c - x, None, x == 0, lam, c, c
    return c + b1 - x, torch.full_like(x, b1 * c), x == 0, lam, c, b1


def _roots(eig: Tensor, p: int, rule: UpdateRule) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor]:
    """Roots of every direction's block: (re1, re2, im, null, lam), each (N, p).

    Single-state maps: μ = re1 (re2, im None). 2×2 blocks: μ = re1 + i·im and re2 − i·im
    (im > 0 only for a complex pair, then re1 = re2 = T/2). Real roots use
    q = (T + sign(T)√disc)/2, μ1 = q, μ2 = Dt/q (no cancellation). Directions with a zero
    effective step get their exact roots (c, β or β1) so that null ones are exactly 1;
    ``null`` marks them (first root only).
    """
    t, dt, zero, lam, c0, c1 = _char_poly(eig, p, rule)
    null = zero & (c0 == 1.0)
    if dt is None:
        return torch.where(zero, torch.full_like(t, c0), t), None, None, null, lam
    # disc = t² − 4·dt, formed scaled by sc² so that huge finite curvature does not overflow
    sc = torch.maximum(t.abs(), (4.0 * dt).abs().sqrt())
    sc = torch.where((sc == 0) | ~torch.isfinite(sc), torch.ones_like(sc), sc)
    disc = (t / sc) ** 2 - 4.0 * (dt / sc) / sc
    real = disc >= 0
    sign = torch.where(t >= 0, 1.0, -1.0).to(t.dtype)
    q = 0.5 * (t + sign * sc * torch.sqrt(torch.clamp(disc, min=0.0)))
    q_safe = torch.where(q == 0, torch.ones_like(q), q)
    mu1 = torch.where(real, q, 0.5 * t)
    mu2 = torch.where(real, torch.where(q == 0, torch.zeros_like(q), dt / q_safe), 0.5 * t)
    im = torch.where(real, torch.zeros_like(t), 0.5 * sc * torch.sqrt(torch.clamp(-disc, min=0.0)))
    mu1 = torch.where(zero, torch.full_like(t, c0), mu1)
    mu2 = torch.where(zero, torch.full_like(t, c1), mu2)
    im = torch.where(zero, torch.zeros_like(im), im)
    return mu1, mu2, im, null, lam


def update_map_eigenvalues(eig: Tensor, p: int, rule: UpdateRule) -> tuple[Tensor, Tensor]:
    """All eigenvalues μ of each node's linearised step, complex128 (N, K), and the null mask.

    K = p for single-state maps, 2p with a buffer (columns [first root of every direction |
    second root of every direction]). The null mask marks μ = 1 directions the step does
    not act on. Meant for inspection and tests; :func:`node_update_spectra` is the
    lean (real-valued) path.
    """
    mu1, mu2, im, null, _lam = _roots(eig, p, rule)
    if mu2 is None:
        return torch.complex(mu1, torch.zeros_like(mu1)), null
    mu = torch.cat([torch.complex(mu1, im), torch.complex(mu2, -im)], dim=1)
    return mu, torch.cat([null, torch.zeros_like(null)], dim=1)


def node_update_spectra(eig: Tensor, p: int, rule: UpdateRule) -> NodeSpectra:
    """Spectra of each node's update map from its curvature eigenvalues (docs/spec.md §5).

    ``eig`` (N, r) eigenvalues (descending; the other p − r are exactly 0): of H_i for the
    SGD family and the fallback, of D^{1/2}(s·H_i + coupled_shift·I)D^{1/2} for Adam/AdamW.
    μ per direction as in the module docstring; |μ| = hypot(Re μ, Im μ) (√Dt for a
    complex pair). Vectorised over nodes; NaN/Inf eigenvalues give NaN/Inf |μ|, never an
    exception.
    """
    eig = _eig_rows(eig, p)
    n, r = eig.shape
    # the p − r implicit zero eigenvalues share one μ: solve them once, with multiplicity p − r
    extra = p - r
    ev = torch.cat([eig, eig.new_zeros(n, 1)], dim=1) if extra else eig
    rc = ev.shape[1]
    mu1, mu2, im, null, lam = _roots(ev, rc, rule)
    mult = torch.ones(rc, dtype=torch.int64, device=ev.device)
    if extra:
        mult[-1] = extra
    blocks = [(mu1.abs() if mu2 is None else torch.hypot(mu1, im), null)]
    if mu2 is not None:
        blocks.append((torch.hypot(mu2, im), torch.zeros_like(null)))
    radius = torch.stack([m.amax(dim=1) for m, _ in blocks], dim=1).amax(dim=1)
    null_dims = (null.to(torch.int64) * mult).sum(dim=1).to(torch.int32)
    acted = (p * len(blocks) - null_dims).to(torch.int32)
    zero_eig = ((lam == 0).to(torch.int64) * mult).sum(dim=1).to(torch.int32)
    # acted-on |μ| first, in direction order (first roots of all p directions, then second
    # roots), NaN padding after; column M collects the dropped (null) entries
    m = int(acted.max()) if n else 0
    mu_abs = torch.full((n, m + 1), math.nan, dtype=torch.float64, device=ev.device)
    cols = torch.arange(m + 1, device=ev.device)[None, :]
    offset = torch.zeros(n, dtype=torch.int64, device=ev.device)
    for mags, nul in blocks:
        keep = ~nul[:, :r]
        pos = torch.where(keep, offset[:, None] + keep.cumsum(dim=1) - 1, m)
        mu_abs.scatter_(1, pos, mags[:, :r])
        offset = offset + keep.sum(dim=1)
        if extra:
            run = (~nul[:, r]).to(torch.int64) * extra
            inside = (cols >= offset[:, None]) & (cols < (offset + run)[:, None])
            mu_abs = torch.where(inside, mags[:, r:], mu_abs)
            offset = offset + run
    return NodeSpectra(
        mu_abs=mu_abs[:, :m], null_dims=null_dims, radius=radius, acted=acted, p=int(p), zero_eig_dims=zero_eig
    )


def stability_threshold(rule: UpdateRule) -> float:
    """The effective curvature at which the map loses stability (|μ| reaches 1 via μ = −1).

    On λ' = s·λ + coupled_shift for the SGD family (subtract ``rule.coupled_shift`` for a
    threshold on the loss Hessian's λ), on λ̃ for Adam/AdamW; it matches the map that
    :func:`node_update_spectra` uses for the same rule (first-step maps included):

    * GD (and any first SGD step with momentum): 2/α; first Nesterov step: 2/(α(1+β));
    * heavy ball: 2(1+β)/(α(1−d));
    * Nesterov: 2(1+β)/(α(1 + 2β − βd))  (μ = −1 in its characteristic polynomial);
    * RMSprop, Adagrad (on λ̃): 2/α_t; RMSprop with momentum: 2(1+β)/α;
    * Adam/AdamW: (1+c)(1+β1)/(a(1−β1)), = (2+2β1)/(a(1−β1)) for Adam (≈ 38/α at
      β1 = 0.9, large t); first step (1+c)/(a(1−β1));
    * fallback: 2/α.
    Returns +inf when the step never destabilises (α = 0, or d = 1 for heavy ball).
    """
    alpha = float(rule.lr)
    beta, d = float(rule.momentum), float(rule.dampening)

    def div(num: float, den: float) -> float:
        if den == 0.0:
            return math.inf if num > 0 else (math.nan if num == 0 else -math.inf)
        return num / den

    kind = rule.kind
    if kind == "nesterov" and not rule.has_buffer:
        return div(2.0, alpha * (1.0 + beta))
    if _single_state(rule):
        return div(2.0, rule.step_lr)
    if kind in ("sgd_momentum", "rmsprop_momentum"):
        return div(2.0 * (1.0 + beta), alpha * (1.0 - d))
    if kind == "nesterov":
        return div(2.0 * (1.0 + beta), alpha * (1.0 + 2.0 * beta - beta * d))
    b1, c, a = float(rule.beta1), rule.decay_factor, rule.bias_corrected_lr
    if not rule.has_buffer:
        return div(1.0 + c, a * (1.0 - b1))
    return div((1.0 + c) * (1.0 + b1), a * (1.0 - b1))
