"""What else changes a step than its gradient: the recorded gradient norms against the replayed
‖∇L(θ_t)‖ (loss scaling, gradient clipping, or a mismatch); see "What else changes the step" in
:mod:`trajscope.dynamics.updatemap`."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: relative tolerance of the gradient-norm comparisons of :func:`step_gradient` (a float32 replay of a
#: float32 run agrees to ~1e-6; clip_grad_norm_ leaves ‖g‖ = max_norm to ~1e-6)
GRAD_NORM_TOL = 1e-3


@dataclass(frozen=True)
class StepGradient:
    """The gradient one step used, against the replayed ‖∇L(θ_t)‖ (module docstring, "What else changes
    the step"). ``factor`` c_t = stepped/replayed; ``loss_scale`` S (a power of two; 1 without scaling;
    NaN when backward's norm is unknown); ``clipped``: 0 < c_t < 1 − tol with backward explained;
    ``mismatch``: the relative gap no clipping or scaling explains (0 when explained, NaN when unknown).
    """

    replayed: float
    stepped: float
    backward: float
    factor: float
    loss_scale: float
    clipped: bool
    mismatch: float

    @property
    def map_factor(self) -> float:
        """c_t where the step was clipped, else 1: the factor the map's curvature is scaled by."""
        return self.factor if self.clipped else 1.0


def step_gradient(
    replayed: float, stepped: float, backward: float, tol: float = GRAD_NORM_TOL, loss_faithful: bool = True
) -> StepGradient:
    """Classify one step's recorded gradient norms against the replayed one (all non-negative floats).

    With r_b = backward/replayed and S = 2^round(log2 r_b): |r_b/S − 1| > tol is a mismatch (of that
    size); else c = stepped/replayed within tol of 1 is a plain step, c < 1 clipping, c > 1 a mismatch
    (c − 1). Unknown norms (NaN: runs recorded before the norms were, a gradient not from backward)
    leave what they would decide unknown: no clipping is claimed without a recorded stepped norm.
    Without the backward norm (several DDP ranks, a callback's first step) c < 1 is clipping only
    when the replayed loss is the recorded one (``loss_faithful``), else a mismatch: a replay of
    another function must not be taken for clipping and rescale the maps.
    """
    nan = math.nan
    if not (math.isfinite(replayed) and math.isfinite(stepped)) or replayed < 0:
        return StepGradient(replayed, stepped, backward, nan, nan, False, nan)
    factor = stepped / replayed if replayed > 0 else (1.0 if stepped == 0 else math.inf)
    scale, scale_gap = nan, 0.0
    if math.isfinite(backward) and replayed > 0 and backward > 0:
        ratio = backward / replayed
        scale = 2.0 ** round(math.log2(ratio))
        scale_gap = abs(ratio / scale - 1.0)
    if scale_gap > tol:
        return StepGradient(replayed, stepped, backward, factor, scale, False, scale_gap)
    if abs(factor - 1.0) <= tol:
        return StepGradient(replayed, stepped, backward, factor, scale, False, 0.0)
    if 0.0 < factor < 1.0 and (loss_faithful or math.isfinite(backward)):
        return StepGradient(replayed, stepped, backward, factor, scale, True, 0.0)
    return StepGradient(replayed, stepped, backward, factor, scale, False, abs(factor - 1.0))
