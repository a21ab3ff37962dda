r"""The update rules of the supported optimizers as the recorder stored them (docs/spec.md §5): one parameter
group's hyperparameters and state as an :class:`UpdateRule`, a node's map when its bias sits in another
group (:class:`NodeMap`), and the optimizer's frozen diagonal preconditioner D.

The maps these rules define, and their spectra, are described in :mod:`trajscope.dynamics.updatemap`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

KINDS = ("sgd", "sgd_momentum", "nesterov", "adam", "adamw", "rmsprop", "rmsprop_momentum", "adagrad", "gd_fallback")
#: kinds whose spectra take λ̃ of D^{1/2}(s·H + coupled_shift)D^{1/2}
PRECONDITIONED = ("adam", "adamw", "rmsprop", "rmsprop_momentum", "adagrad")


@dataclass(frozen=True)
class UpdateRule:
    """The linearised update rule of one parameter group at one step.

    Fields: ``kind`` (one of :data:`KINDS`); ``lr`` α; ``weight_decay`` wd; SGD:
    ``momentum`` β, ``dampening`` d, ``has_buffer`` (a momentum buffer exists before the
    step; for Adam: ``exp_avg`` exists), Adam: ``beta1``, ``beta2``, ``eps``, ``step``
    (the recorded state step BEFORE the update; the update uses t = step + 1),
    ``amsgrad``; ``maximize`` (the optimizer ascends: the curvature enters mirrored,
    s = −1); ``optimizer`` (class name as recorded) and ``note`` (why a map was chosen,
    e.g. a fallback). Added beyond the brief: ``maximize``.
    """

    kind: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    has_buffer: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step: int = 0
    amsgrad: bool = False
    centered: bool = False
    lr_decay: float = 0.0
    maximize: bool = False
    optimizer: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown update rule kind {self.kind!r}; expected one of {KINDS}")

    @property
    def preconditioned(self) -> bool:
        """Adam/AdamW, RMSprop, Adagrad: the spectra take λ̃ of D^{1/2}(s·H + coupled_shift)D^{1/2}."""
        return self.kind in PRECONDITIONED

    @property
    def coupled_shift(self) -> float:
        """wd added to the curvature by coupled L2 decay (SGD family, Adam, RMSprop, Adagrad); 0 for AdamW/fallback."""
        coupled = ("sgd", "sgd_momentum", "nesterov", "adam", "rmsprop", "rmsprop_momentum", "adagrad")
        return float(self.weight_decay) if self.kind in coupled else 0.0

    @property
    def curvature_sign(self) -> float:
        """s = −1 when the optimizer maximises (gradient negated before decay), else 1."""
        return -1.0 if self.maximize else 1.0

    @property
    def decay_factor(self) -> float:
        """c: the factor θ is multiplied by before the step (1 − α·wd for AdamW, else 1)."""
        return 1.0 - float(self.lr) * float(self.weight_decay) if self.kind == "adamw" else 1.0

    @property
    def step_lr(self) -> float:
        """The step size the update multiplies D·g by: Adagrad's decayed α/(1 + step·lr_decay), else α."""
        if self.kind == "adagrad":
            return float(self.lr) / (1.0 + int(self.step) * float(self.lr_decay))
        return float(self.lr)

    @property
    def bias_corrected_lr(self) -> float:
        """a = α/(1 − β1^(step+1)), Adam's step size at the update's step count."""
        return float(self.lr) / (1.0 - float(self.beta1) ** (int(self.step) + 1))


@dataclass(frozen=True)
class NodeMap:
    r"""How to get one node's update-map spectrum: ``rule`` gives μ from curvature eigenvalues.
    With ``transformed`` those are the λ̃ of :math:`(DA)^{1/2}(s H_i + \mathrm{diag}(shift))(DA)^{1/2}`
    (s = ``sign``, D = Adam's preconditioner or I, A = diag(``lr_scale``) or I), else of H_i
    itself. ``note`` says when the map is only approximate."""

    rule: UpdateRule
    transformed: bool
    sign: float = 1.0
    shift: float | Tensor = 0.0
    lr_scale: Tensor | None = None
    note: str = ""


def node_map(weight_rule: UpdateRule, bias_rule: UpdateRule | None, p: int) -> NodeMap:
    """The map of a node of p parameters (the last one the bias when ``bias_rule`` is given)
    whose weight row steps with ``weight_rule`` and bias with ``bias_rule``.

    One group (or equal rules): the group's map. Two groups that differ only in lr and weight
    decay (for AdamW: with equal decay factors 1 − α·wd): exact, with per-coordinate
    ``lr_scale`` α_k/α and ``shift`` (coupled wd_k). Otherwise the weight group's map, with a
    ``note`` saying which hyperparameters differ."""
    w, b = weight_rule, bias_rule
    plain = NodeMap(w, w.preconditioned, w.curvature_sign, w.coupled_shift)
    if b is None or b == w:
        return plain
    differ = [
        f
        for f in ("kind", "momentum", "dampening", "has_buffer", "beta1", "beta2", "eps", "step", "amsgrad", "maximize")
        if getattr(b, f) != getattr(w, f)
    ]
    if w.kind == "adamw" and not math.isclose(b.decay_factor, w.decay_factor, rel_tol=1e-12, abs_tol=0.0):
        differ.append("decoupled decay factor (1 - lr*weight_decay)")
    if not (math.isfinite(w.lr) and w.lr > 0 and math.isfinite(b.lr) and b.lr >= 0):
        differ.append("lr")
    if differ:
        return dataclasses.replace(
            plain,
            note=f"bias in a parameter group with a different {', '.join(differ)}: "
            "the weight group's map is used for the whole node (approximate)",
        )
    scale = torch.ones(p, dtype=torch.float64)
    scale[-1] = b.lr / w.lr
    if w.kind == "gd_fallback":  # the fallback ignores decay and sign
        return NodeMap(w, True, 1.0, 0.0, scale)
    shift = torch.full((p,), w.coupled_shift, dtype=torch.float64)
    shift[-1] = b.coupled_shift
    # λ̃ carries the sign and the shift; the SGD family's formulas then take λ' = λ̃
    rule = w if w.preconditioned else dataclasses.replace(w, weight_decay=0.0, maximize=False)
    return NodeMap(rule, True, w.curvature_sign, shift, scale)


def _scalar(value: Any, default: float) -> float:
    """A float from a recorded hyperparameter or state entry (number, 0-d tensor, None)."""
    if value is None:
        return default
    if isinstance(value, Tensor):
        return float(value.detach().reshape(-1)[0]) if value.numel() else default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def update_rule(optimizer_class: str, hparams: Mapping[str, Any], state: Mapping[str, Any] | None) -> UpdateRule:
    """The :class:`UpdateRule` of one parameter group from what the recorder stored.

    ``optimizer_class`` is the class name, bare (``"SGD"``) or qualified
    (``"torch.optim.sgd.SGD"``); ``hparams`` the group's PyTorch hyperparameters;
    ``state`` one parameter's optimizer state before the update (may be None/empty).
    ``torch.optim.Adam`` with ``decoupled_weight_decay=True`` is AdamW (which is how
    torch implements AdamW). Other optimizers get the plain gradient-descent map
    μ = 1 − αλ with the group's lr (NaN when the group has no lr) and a note.
    """
    name = str(optimizer_class).rsplit(".", 1)[-1]
    hp = dict(hparams or {})
    g = _Group(
        name,
        hp,
        dict(state or {}),
        _scalar(hp.get("lr"), math.nan),
        _scalar(hp.get("weight_decay"), 0.0),
        bool(hp.get("maximize", False)),
        str(optimizer_class),
        [],
    )
    if g.maximize:
        g.notes.append("maximize=True: curvature enters mirrored (λ -> -λ)")
    build = _RULES.get("Adam" if name == "AdamW" else name)
    if build is not None:
        return build(g)
    notes = [f"unsupported optimizer {name}: plain gradient-descent map with the group's lr"]
    if g.maximize:
        notes.append("maximize=True is not modelled by this map")
    return UpdateRule("gd_fallback", g.lr, g.wd, optimizer=g.optimizer, note="; ".join(notes))


@dataclass
class _Group:
    """What :func:`update_rule` reads of one parameter group: the optimizer's bare class name, its
    hyperparameters and one parameter's state, the parsed lr / weight decay / maximize, and the notes so far."""

    name: str
    hp: dict
    st: dict
    lr: float
    wd: float
    maximize: bool
    optimizer: str
    notes: list


def _sgd_rule(g: _Group) -> UpdateRule:
    hp, st, notes = g.hp, g.st, g.notes
    beta = _scalar(hp.get("momentum"), 0.0)
    damp = _scalar(hp.get("dampening"), 0.0)
    nesterov = bool(hp.get("nesterov", False))
    kind = "sgd" if beta == 0.0 else ("nesterov" if nesterov else "sgd_momentum")
    has_buffer = kind != "sgd" and st.get("momentum_buffer") is not None
    if kind != "sgd" and not has_buffer:
        notes.append("no momentum buffer yet (first step): single-step map")
    return UpdateRule(
        kind,
        g.lr,
        g.wd,
        momentum=beta,
        dampening=damp if kind != "sgd" else 0.0,
        has_buffer=has_buffer,
        maximize=g.maximize,
        optimizer=g.optimizer,
        note="; ".join(notes),
    )


def _adam_rule(g: _Group) -> UpdateRule:
    hp, st, notes = g.hp, g.st, g.notes
    betas = hp.get("betas", (0.9, 0.999))
    b1, b2 = _scalar(betas[0], 0.9), _scalar(betas[1], 0.999)
    decoupled = g.name == "AdamW" or bool(hp.get("decoupled_weight_decay", False))
    has_buffer = st.get("exp_avg") is not None
    step = int(_scalar(st.get("step"), 0.0)) if has_buffer or "step" in st else 0
    if not has_buffer:
        notes.append("no exp_avg yet (first step): single-step map")
    return UpdateRule(
        "adamw" if decoupled else "adam",
        g.lr,
        g.wd,
        has_buffer=has_buffer,
        beta1=b1,
        beta2=b2,
        eps=_scalar(hp.get("eps"), 1e-8),
        step=step,
        amsgrad=bool(hp.get("amsgrad", False)),
        maximize=g.maximize,
        optimizer=g.optimizer,
        note="; ".join(notes),
    )


def _rmsprop_rule(g: _Group) -> UpdateRule:
    hp, st, notes = g.hp, g.st, g.notes
    beta = _scalar(hp.get("momentum"), 0.0)
    has_buffer = beta != 0.0 and st.get("momentum_buffer") is not None
    if beta != 0.0 and not has_buffer:
        notes.append("no momentum buffer yet (first step): single-step map")
    return UpdateRule(
        "rmsprop_momentum" if beta != 0.0 else "rmsprop",
        g.lr,
        g.wd,
        momentum=beta,
        has_buffer=has_buffer,
        beta2=_scalar(hp.get("alpha"), 0.99),
        eps=_scalar(hp.get("eps"), 1e-8),
        step=int(_scalar(st.get("step"), 0.0)),
        centered=bool(hp.get("centered", False)),
        maximize=g.maximize,
        optimizer=g.optimizer,
        note="; ".join(notes),
    )


def _adagrad_rule(g: _Group) -> UpdateRule:
    hp, st = g.hp, g.st
    return UpdateRule(
        "adagrad",
        g.lr,
        g.wd,
        eps=_scalar(hp.get("eps"), 1e-10),
        step=int(_scalar(st.get("step"), 0.0)),
        lr_decay=_scalar(hp.get("lr_decay"), 0.0),
        maximize=g.maximize,
        optimizer=g.optimizer,
        note="; ".join(g.notes),
    )


#: the optimizers with an update map, by bare class name (AdamW is Adam's)
_RULES = {"SGD": _sgd_rule, "Adam": _adam_rule, "RMSprop": _rmsprop_rule, "Adagrad": _adagrad_rule}


def preconditioner(rule: UpdateRule, state: Mapping[str, Tensor], grad: Tensor, param: Tensor | None = None) -> Tensor:
    """The diagonal D the real step divides the gradient by, from one parameter's recorded state.

    Adam/AdamW: :func:`adam_preconditioner`. RMSprop: 1/(√v_used + ε), v_used = ρ·square_avg +
    (1−ρ)g² (centered: minus (ρ·grad_avg + (1−ρ)g)²). Adagrad: 1/(√(sum + g²) + ε). g is the
    gradient the step feeds its moments: s·grad + wd·θ (coupled decay).
    """
    if rule.kind in ("adam", "adamw"):
        return adam_preconditioner(rule, state.get("exp_avg_sq"), grad, state.get("max_exp_avg_sq"), param=param)
    g = _moment_gradient(rule, grad, param)

    def moment(key: str) -> Tensor:
        v = state.get(key)
        return torch.zeros_like(g) if v is None else v.detach().to(torch.result_type(g, v))

    if rule.kind == "adagrad":
        return 1.0 / (torch.sqrt(moment("sum") + g * g) + float(rule.eps))
    rho = float(rule.beta2)
    v_used = rho * moment("square_avg") + (1.0 - rho) * g * g
    if rule.centered:
        mean = rho * moment("grad_avg") + (1.0 - rho) * g
        v_used = v_used - mean * mean
    return 1.0 / (torch.sqrt(v_used) + float(rule.eps))


def _moment_gradient(rule: UpdateRule, grad: Tensor, param: Tensor | None) -> Tensor:
    """The gradient an adaptive step feeds its moments: s·grad, plus wd·θ under coupled decay."""
    g = -grad.detach() if rule.maximize else grad.detach()
    if rule.coupled_shift != 0 and param is not None:
        g = g + rule.coupled_shift * param.detach().to(g.dtype)
    return g


def adam_preconditioner(
    rule: UpdateRule,
    exp_avg_sq: Tensor | None,
    grad: Tensor,
    max_exp_avg_sq: Tensor | None = None,
    param: Tensor | None = None,
) -> Tensor:
    """D = 1/(√(v_used/(1 − β2^(step+1))) + ε), the diagonal the real Adam step divides by.

    v_used = β2·v + (1−β2)·g² is the second moment after the step's own update (v = 0
    before the first step; with amsgrad, v_used = max(max_exp_avg_sq, v_used)), where g is
    the gradient the step feeds into v: s·grad (+ wd·θ for Adam's coupled L2 decay).
    ``grad`` is the raw loss gradient; pass ``param`` (θ_t, added beyond the brief) so that
    the coupled decay enters g as in torch (without it, ``grad`` is used as g).
    Same shape as the parameter, dtype of ``grad`` promoted with the state.
    """
    b2 = float(rule.beta2)
    g = _moment_gradient(rule, grad, param)
    v = torch.zeros_like(g) if exp_avg_sq is None else exp_avg_sq.detach().to(torch.result_type(g, exp_avg_sq))
    v_used = b2 * v + (1.0 - b2) * g * g
    if rule.amsgrad and max_exp_avg_sq is not None:
        v_used = torch.maximum(max_exp_avg_sq.detach().to(v_used.dtype), v_used)
    bc2 = 1.0 - b2 ** (int(rule.step) + 1)
    return 1.0 / (torch.sqrt(v_used / bc2) + float(rule.eps))
