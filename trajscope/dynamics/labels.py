r"""Node labels, reason codes, stable labels and presets (docs/spec.md §7).

Labels (codes used everywhere): 0 ``healthy_sink``, 1 ``degenerate_sink``, 2 ``plateau``
(non-hyperbolic), 3 ``source``.

Preset ``"excited"`` (default) judges a node by the directions its motion actually excites,
over the horizon the linearisation is used for. Let u_i be the node's recorded motion
(θ_{t'} − θ_t to the next recorded step t', which is t + 1 in a window-2 recording, or the step
direction D·g_i where the node did not move or no later step is recorded) and

.. math::  \lambda_u = \frac{\tilde u^\top A_i \tilde u}{\tilde u^\top \tilde u},
           \qquad \tilde u = D^{-1/2} u_i,

the curvature of the map's operator A_i (H_i for the SGD family, D^{1/2}(s H_i + c)D^{1/2} for
the adaptive optimizers; :mod:`~trajscope.dynamics.updatemap`, :mod:`~trajscope.dynamics.motion`)
along that motion. The roots
μ_u of the update map of a direction with curvature λ_u say what the step does to the motion:
``motion_radius`` = max |μ_u| and ``motion_neutral`` = min |μ_u − 1|
(:func:`~trajscope.dynamics.motion.motion_from_eigs`).

1. ``source`` if motion_radius > 1 + δ: the motion itself grows (``expanding``);
2. ``degenerate_sink`` if ‖θ_i‖ ≤ collapse_ratio · reference                 (``collapsed``);
3. ``plateau`` if the loss has no curvature at all in the node (H_i = 0) and no gradient,
   whatever weight decay does (``dead``); if no direction is acted on but the gradient is
   nonzero (``drifting``); or if min |μ_u − 1| ≤ δ and the node's share of the step's
   first-order loss decrease, s_i = −g_i·u_i over an equal share Σ_j|s_j|/N (every node of
   every layer), is below ``share_min`` = 1/100: its motion lies in directions the step barely
   changes and does not reduce the loss, so it stays as it is within the horizon (``flat_motion``);
4. ``healthy_sink`` otherwise: the motion contracts (a period-2 oscillation, μ_u ≈ −1 with
   |μ_u| ≤ 1 + δ, e.g. at the edge of stability, contracts on average and is a sink here).

A direction that carries none of the motion cannot make the node a plateau or a source:
a live unit's tiny eigenvalues from low-variance inputs, or a slightly negative exact
curvature at the edge of stability, are not excited by its step.

δ for this preset (``resolve_delta``, ``horizon`` = K training steps between analysed
checkpoints, the span over which one checkpoint's linear map stands for the dynamics):
δ = min(1/K, 0.01). A motion with |μ_u| = 1 ± 1/K changes by a factor e^{±1} over the
horizon ((1 ± 1/K)^K ≈ e^{±1}): one closer to 1 neither converges nor grows before the
map is re-evaluated; one further from 1 does so appreciably. The cap keeps analyses of
densely analysed runs no looser than the theory note's band (docs/theory.md §7).

Preset ``"acted"`` (the default before the label-validity benchmark, docs/concepts.md) looks at
every direction the step acts on (the |μ| in :class:`~trajscope.dynamics.updatemap.NodeSpectra`
``mu_abs``); with r = max acted |μ|:

1. ``source``  if r > 1 + δ                                           (reason ``expanding``);
2. ``plateau`` if no parameter direction is acted on, i.e. null_dims = p (a dead node:
   zero effective curvature; under momentum only the buffer's own μ = β remain)
   (reason ``dead`` when the gradient is 0 as well, ``drifting`` when it is not: the node
   moves at constant velocity on a flat piece, e.g. L1/hinge losses), or if some acted
   | |μ| − 1 | ≤ δ                                                     (``neutral_direction``);
3. ``degenerate_sink`` if ‖θ_i‖ ≤ collapse_ratio · reference          (``collapsed``);
4. ``healthy_sink`` otherwise (every acted |μ| < 1 − δ)                (``contracting``).

δ for the acted preset (``resolve_delta``): with T recorded training steps, δ = 1/T: a direction with
|μ| ∈ [1−δ, 1+δ] changes by less than a factor e^{±1} over the whole run
((1 ± 1/T)^T ≈ e^{±1}), so within this run it neither contracts nor grows: neutral. δ is
capped at the theory note's own band 0.01 (docs/theory.md §7) so that short runs are never labelled more loosely
than the seed does.

Preset ``"seed"``: the recipe of the theory note (docs/theory.md §7) literally, over ALL directions of the
map (null ones included, μ = 1) with its constants:

1. ``source`` if some |μ| > 1 + eps_contract (outside the seed's "≈1" band) (``expanding``);
2. ``plateau`` if (‖g_i‖ < eps_grad and loss > eps_loss)          (``seed_flat_gradient``),
   or σ_min(H_i) < eps_curv                                       (``seed_zero_curvature``),
   or some |μ| ∈ [1 − eps_contract, 1 + eps_contract]           (``seed_unit_eigenvalue``)
   (the first that holds names the reason);
3. sink: every |μ| < 1 − eps_contract; ``degenerate_sink`` if ‖θ_i‖ < eps_param (absolute)
   (``collapsed``), else ``healthy_sink`` (``contracting``).
σ_min(H_i) is 0 when H_i has an exact zero eigenvalue (``spectra.zero_eig_dims`` > 0, e.g.
r < p), else taken from ``hess_min`` (the smallest eigenvalue of H_i: equal to σ_min for
the theory note's positive semi-definite Gauss-Newton block (docs/theory.md §4); a negative one counts as < eps_curv).
The theory note gives no value for eps_loss; 1e-4 is used.

Non-finite input (any NaN among the acted |μ| or the radius, or a non-finite ‖θ_i‖): label
``source`` with reason ``nonfinite`` under every preset — NaN/Inf come from a diverged
trajectory, which is not a fixed point of any kind, and the label must never be missing.
A node with neither motion nor gradient has no λ_u (NaN): nothing is excited, so the
excited preset finds it neither flat nor expanding.

``neutral_dims`` (every preset): acted-on directions with | |μ| − 1 | ≤ δ.

Longer than 400 lines because the module docstring states every preset's rules, which the code
below follows line by line; the code itself is about 320 lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trajscope.dynamics.updatemap import NodeSpectra
from trajscope.errors import TrajscopeError

__all__ = [
    "LABELS",
    "REASONS",
    "REASON_DOCS",
    "PRESETS",
    "LabelConfig",
    "resolve_delta",
    "collapse_reference_norm",
    "classify",
    "stable_labels",
    "StableLabelState",
]

LABELS = ("healthy_sink", "degenerate_sink", "plateau", "source")
HEALTHY_SINK, DEGENERATE_SINK, PLATEAU, SOURCE = range(4)
PRESETS = ("excited", "acted", "seed")

REASON_DOCS: dict[str, str] = {
    "contracting": "healthy sink: every acted-on |mu| < 1 - delta, norm not collapsed",
    "collapsed": "degenerate sink: contracting and the norm collapsed (acted: <= collapse_ratio x reference; seed: < eps_param)",
    "neutral_direction": "plateau: some acted-on |mu| within delta of 1",
    "dead": "plateau: no parameter direction acted on (zero effective curvature) and zero gradient",
    "drifting": "plateau: no parameter direction acted on but a nonzero gradient (constant-velocity motion on a flat piece)",
    "expanding": "source: some |mu| > 1 + delta (excited: along the node's motion; seed: > 1 + eps_contract)",
    "nonfinite": "source: NaN/Inf spectrum or parameter norm (diverged trajectory)",
    "seed_flat_gradient": "seed plateau: gradient norm < eps_grad while loss > eps_loss",
    "seed_zero_curvature": "seed plateau: sigma_min(H_i) < eps_curv",
    "seed_unit_eigenvalue": "seed plateau: some |mu| (all directions) within eps_contract of 1",
    "flat_motion": "plateau: the step barely changes the node's motion (min |mu_u - 1| <= delta) and it accounts for < share_min of an equal share of the loss decrease",
}
REASONS: tuple[str, ...] = tuple(REASON_DOCS)
_R = {name: i for i, name in enumerate(REASONS)}


@dataclass
class LabelConfig:
    """How nodes are labelled (see the module docstring for the rules).

    ``preset`` "excited" | "acted" | "seed"; ``delta`` δ (None: derived, :func:`resolve_delta`);
    ``collapse_ratio`` / ``collapse_reference`` ("first": the node's own first analysed
    norm, "layer_median": the median node norm of its layer at this step) for the acted
    preset's degenerate sinks; ``stable_window`` checkpoints a label must persist to become
    the stable label; ``share_min``: the excited preset's bound on a plateau's share of the
    step's loss decrease (× an equal share); ``eps_*``: the seed preset's literal constants (docs/theory.md §7).
    """

    preset: str = "excited"
    delta: float | None = None
    collapse_ratio: float = 0.1
    collapse_reference: str = "first"
    stable_window: int = 3
    eps_contract: float = 0.01
    eps_param: float = 1e-4
    eps_grad: float = 1e-6
    eps_loss: float = 1e-4
    eps_curv: float = 1e-4
    share_min: float = 0.01

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise TrajscopeError(f"unknown label preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        if self.collapse_reference not in ("first", "layer_median"):
            raise TrajscopeError(
                f"unknown collapse reference {self.collapse_reference!r}: use 'first' or 'layer_median'"
            )
        if self.delta is not None and not (self.delta >= 0 and math.isfinite(self.delta)):
            raise TrajscopeError(f"label delta must be a finite number >= 0, got {self.delta}")
        if self.stable_window < 1:
            raise TrajscopeError(f"stable_window must be >= 1, got {self.stable_window}")
        if not 0 <= self.collapse_ratio < 1:
            raise TrajscopeError(
                f"collapse ratio must be in [0, 1) (a node is collapsed when its norm falls to that "
                f"fraction of its reference), got {self.collapse_ratio}"
            )
        for name in ("eps_contract", "eps_param", "eps_grad", "eps_loss", "eps_curv", "share_min"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise TrajscopeError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")


def resolve_delta(config: LabelConfig, total_steps: int, horizon: int | None = None) -> float:
    """δ: ``config.delta`` if set; seed preset: eps_contract; excited: min(1/K, eps_contract)
    with K = ``horizon`` (training steps between analysed checkpoints; ``total_steps`` when
    None); acted: min(1/T, eps_contract) with T = ``total_steps`` (≥ 1 assumed).
    """
    if config.delta is not None:
        return float(config.delta)
    if config.preset == "seed":
        return float(config.eps_contract)
    span = horizon if config.preset == "excited" and horizon else total_steps
    return min(1.0 / max(int(span), 1), float(config.eps_contract))


def collapse_reference_norm(config: LabelConfig, param_norm: Tensor, first_norm: Tensor | None = None) -> Tensor:
    """The collapse reference per node: its first analysed norm, or the layer's median norm now.

    ``first_norm`` defaults to ``param_norm`` (the first checkpoint is its own reference).
    """
    pn = param_norm.to(torch.float64)
    if config.collapse_reference == "layer_median":  # the usual median: mean of the middle two
        med = torch.nanquantile(pn, 0.5) if pn.numel() else torch.tensor(math.nan, dtype=torch.float64)
        return med.expand(pn.shape).clone()
    return pn if first_norm is None else first_norm.to(pn)


def classify(
    spectra: NodeSpectra,
    param_norm: Tensor,
    reference_norm: Tensor,
    grad_norm: Tensor,
    hess_min: Tensor,
    loss: float,
    config: LabelConfig,
    delta: float,
    motion: tuple[Tensor, Tensor, Tensor] | None = None,
    hess_max: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(label uint8 (N,), reason uint8 (N,), neutral_dims int32 (N,))`` for one layer.

    ``param_norm`` ‖θ_i‖, ``reference_norm`` the collapse reference (:func:`collapse_reference_norm`),
    ``grad_norm`` ‖∇_{θ_i}L‖, ``hess_min`` the smallest eigenvalue of H_i over all p
    directions (seed preset; with ``hess_max`` the excited preset's H_i = 0 test), ``loss`` the
    checkpoint's loss (seed preset only), ``motion`` = (motion_radius, motion_neutral, loss_share):
    the first two from :func:`~trajscope.dynamics.motion.motion_from_eigs`, the third the node's share of the step's
    first-order loss decrease over an equal share (excited preset; None: no motion known).
    Vectorised; never raises on non-finite values.
    """
    mu = spectra.mu_abs.to(torch.float64)
    n, m = mu.shape
    acted = spectra.acted.to(torch.int64)
    pn = param_norm.to(torch.float64).reshape(n)
    gn = grad_norm.to(torch.float64).reshape(n)
    # Row i holds acted[i] values, then NaN padding. NaN fails every comparison, so the tests
    # need no validity mask (an (N, M) pass each, and M ~ p for wide layers); a NaN among the
    # valid values shows as more NaNs than the padding.
    dev1 = (mu - 1.0).abs_()

    neutral_dims = (dev1 <= delta).sum(dim=1, dtype=torch.int32)
    nonfinite = (
        (torch.isnan(mu).sum(dim=1) > m - acted)
        | torch.isinf(mu).any(dim=1)
        | ~torch.isfinite(spectra.radius.to(torch.float64))
        | ~torch.isfinite(pn)
    )
    acted_max = (
        torch.nan_to_num(mu, nan=-math.inf, posinf=math.inf).amax(dim=1)
        if m
        else torch.full((n,), -math.inf, dtype=torch.float64)
    )

    label = torch.full((n,), HEALTHY_SINK, dtype=torch.uint8)
    reason = torch.full((n,), _R["contracting"], dtype=torch.uint8)

    def put(mask: Tensor, lab: int, why: str) -> None:
        # later calls override earlier ones: call in reverse precedence order
        label.masked_fill_(mask, lab)
        reason.masked_fill_(mask, _R[why])

    args = (put, spectra, pn, gn, reference_norm, hess_min, config, delta)
    if config.preset == "excited":
        _excited(*args, motion, hess_max)
    elif config.preset == "acted":
        _acted(*args, neutral_dims, acted_max)
    else:
        _seed(*args, dev1, loss)
    put(nonfinite, SOURCE, "nonfinite")
    return label, reason, neutral_dims


_Put = Callable[[Tensor, int, str], None]


def _excited(
    put: _Put,
    spectra: NodeSpectra,
    pn: Tensor,
    gn: Tensor,
    reference_norm: Tensor,
    hess_min: Tensor,
    config: LabelConfig,
    delta: float,
    motion: tuple[Tensor, Tensor, Tensor] | None,
    hess_max: Tensor | None,
) -> None:
    """The excited preset's rules, in reverse precedence order (module docstring)."""
    n = pn.shape[0]
    acted, null = spectra.acted.to(torch.int64), spectra.null_dims.to(torch.int64)
    nan = torch.full((n,), math.nan, dtype=torch.float64)
    m_radius, m_neutral, share = (nan, nan, nan) if motion is None else (m.to(torch.float64).reshape(n) for m in motion)
    hmax = nan if hess_max is None else hess_max.to(torch.float64).reshape(n)
    hmin = hess_min.to(torch.float64).reshape(n)
    put((m_neutral <= delta) & ~(share.abs() >= config.share_min), PLATEAU, "flat_motion")
    no_dir = null >= spectra.p if spectra.p else acted == 0
    put(no_dir & (gn > 0), PLATEAU, "drifting")
    put((no_dir | ((hmax == 0) & (hmin == 0))) & ~(gn > 0), PLATEAU, "dead")
    put(pn <= config.collapse_ratio * reference_norm.to(torch.float64).reshape(n), DEGENERATE_SINK, "collapsed")
    put(m_radius - 1.0 > delta, SOURCE, "expanding")


def _acted(
    put: _Put,
    spectra: NodeSpectra,
    pn: Tensor,
    gn: Tensor,
    reference_norm: Tensor,
    hess_min: Tensor,
    config: LabelConfig,
    delta: float,
    neutral_dims: Tensor,
    acted_max: Tensor,
) -> None:
    """The acted preset's rules, in reverse precedence order (module docstring)."""
    n = pn.shape[0]
    acted, null = spectra.acted.to(torch.int64), spectra.null_dims.to(torch.int64)
    put(pn <= config.collapse_ratio * reference_norm.to(torch.float64).reshape(n), DEGENERATE_SINK, "collapsed")
    put(neutral_dims > 0, PLATEAU, "neutral_direction")
    no_dir = null >= spectra.p if spectra.p else acted == 0
    put(no_dir & (gn > 0), PLATEAU, "drifting")
    put(no_dir & ~(gn > 0), PLATEAU, "dead")
    put(acted_max - 1.0 > delta, SOURCE, "expanding")  # not > fl(1 + δ): the neutral test is |μ| − 1 ≤ δ


def _seed(
    put: _Put,
    spectra: NodeSpectra,
    pn: Tensor,
    gn: Tensor,
    reference_norm: Tensor,
    hess_min: Tensor,
    config: LabelConfig,
    delta: float,
    dev1: Tensor,
    loss: float | None,
) -> None:
    """The seed preset's rules, in reverse precedence order (module docstring)."""
    n = pn.shape[0]
    null = spectra.null_dims.to(torch.int64)
    eps = float(config.eps_contract)
    put(pn < config.eps_param, DEGENERATE_SINK, "collapsed")
    unit = (dev1 <= eps).any(dim=1) | (null > 0)  # null directions have μ = 1
    put(unit, PLATEAU, "seed_unit_eigenvalue")
    zero_eig = spectra.zero_eig_dims
    zero_curv = hess_min.to(torch.float64).reshape(n) < config.eps_curv
    if zero_eig is not None:
        zero_curv = zero_curv | (zero_eig > 0)
    put(zero_curv, PLATEAU, "seed_zero_curvature")
    loss_v = math.nan if loss is None else float(loss)
    put((gn < config.eps_grad) & (loss_v > config.eps_loss), PLATEAU, "seed_flat_gradient")
    put(spectra.radius.to(torch.float64) - 1.0 > eps, SOURCE, "expanding")


def stable_labels(history: Tensor | None, previous_stable: Tensor | None, label: Tensor, window: int) -> Tensor:
    """Hysteresis: the stable label takes the current label once it held ``window`` checkpoints.

    ``history`` (k, N): earlier instantaneous labels, most recent last (None: none).
    The label has held when it equals each of the last ``window − 1`` rows of ``history``;
    otherwise the stable label stays ``previous_stable`` (None, i.e. the first checkpoint:
    the label itself). window ≤ 1 returns the label. uint8 (N,).
    """
    label = label.to(torch.uint8)
    if window <= 1 or previous_stable is None:
        return label.clone()
    prev = previous_stable.to(torch.uint8)
    need = window - 1
    if history is None or history.shape[0] < need:
        return prev.clone()
    held = (history[-need:].to(torch.uint8) == label[None, :]).all(dim=0)
    return torch.where(held, label, prev)


class StableLabelState:
    """The stable-label hysteresis carried across the checkpoints of a run, per layer.

    Per layer it keeps the last ``window − 1`` instantaneous labels and the last stable label
    (:func:`stable_labels`); an appended analysis resumes from what the earlier ones wrote.

    Args:
        layers: the layer names.
        window: checkpoints a label must persist to become the stable label (``LabelConfig.stable_window``;
            values below 1 count as 1).
    """

    def __init__(self, layers: Iterable[str], window: int) -> None:
        self.window = max(1, window)
        self.history: dict[str, list[np.ndarray]] = {l: [] for l in layers}
        self.stable: dict[str, np.ndarray | None] = {l: None for l in self.history}

    def resume(self, layer: str, labels: np.ndarray, stable: np.ndarray) -> None:
        """Continue from an earlier analysis: ``labels`` (k, N) its instantaneous labels, oldest first,
        ``stable`` (N,) its last stable label."""
        self.history[layer] = [row for row in labels[-(self.window - 1) :]] if self.window > 1 else []
        self.stable[layer] = stable

    def update(self, layer: str, label: np.ndarray, hysteresis: bool = True) -> np.ndarray:
        """The stable label (uint8 (N,)) of the next checkpoint, whose instantaneous label is ``label``;
        ``hysteresis`` False (labels not computed): the label itself.

        Returns:
            the stable label, which is also remembered for the next checkpoint.
        """
        if not hysteresis:
            stable = label
        else:
            hist = torch.from_numpy(np.stack(self.history[layer])) if self.history[layer] else None
            ps = torch.from_numpy(self.stable[layer]) if self.stable[layer] is not None else None
            stable = stable_labels(hist, ps, torch.from_numpy(label), self.window).numpy().astype(np.uint8)
        self.history[layer] = (self.history[layer] + [label])[-(self.window - 1) :] if self.window > 1 else []
        self.stable[layer] = stable
        return stable
