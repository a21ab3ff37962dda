"""The run-level checks of an analysis: the fidelity check (replayed against recorded loss and gradient
norm), what changed the steps (clipping, loss scaling) and how train-mode layers were replayed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trajscope.dynamics.stepgrad import GRAD_NORM_TOL
from trajscope.replay import trainmode as replay_mod


def _steps_text(steps: Sequence[int]) -> str:
    """The first five steps, then "..." if there are more."""
    return ", ".join(map(str, steps[:5])) + (", ..." if len(steps) > 5 else "")


def train_mode_summary(an: Any, opts: Any) -> dict[str, Any]:
    """How train-mode layers were replayed (results attribute ``train_mode_replay``), with the summary's lines:
    one note saying how, and one WARNING per way the replay departed from training (with its steps)."""
    sensitive = replay_mod.mode_sensitive(an.model, an.recorded_sensitive) if an.model is not None else []
    out: dict[str, Any] = {
        "mode": opts.train_mode,
        "modules": sensitive,
        "coupled_curvature": an.coupled,
        "replayed_checkpoints": an.n_replayed,
        "departures": [{"why": why, "steps": steps} for why, steps in an.replay_issues.items()],
        "notes": [],
    }
    if not sensitive:
        return out
    if opts.train_mode == "off":
        out["notes"].append(
            f"--train-mode off: BatchNorm and dropout ({len(sensitive)} module(s)) replayed in eval "
            f"mode (running statistics, no dropout), not as trained"
        )
    elif an.n_replayed:
        out["notes"].append(
            "train-mode layers replayed as trained (BatchNorm on each micro-batch's statistics, "
            "dropout with the recorded RNG state)"
            + ("; BatchNorm couples the samples: node blocks include cross-sample terms" if an.coupled else "")
        )
    warn = "" if opts.batch == "probe" else "WARNING: "  # the probe in eval mode is the design, not a departure
    for why, steps in an.replay_issues.items():
        out["notes"].append(f"{warn}{why} (steps {_steps_text(steps)})")
    return out


#: relative gap between the replayed and the recorded loss above which the replay is said to differ
#: from training (float32 replay of a float32 run agrees to ~1e-6)
FIDELITY_TOL = 1e-4


def loss_fidelity(mismatches: Mapping[int, float]) -> dict[str, Any]:
    """The fidelity check of the analysed checkpoints: how far the replayed loss is from the recorded one."""
    over = sorted(s for s, m in mismatches.items() if not m <= FIDELITY_TOL)
    worst = max(mismatches.values(), default=math.nan)
    note = None
    if over:
        note = (
            f"WARNING: the replayed loss differs from the recorded loss by up to {100 * worst:.3g}% at "
            f"{len(over)} of {len(mismatches)} checkpoints (steps {_steps_text(over)}): the analysis describes another "
            f"function than the one trained (train-mode BatchNorm or dropout, a loss computed differently in "
            f"the loop, micro-batches not all given to rec.batch, or another --model/--loss)"
        )
    return {
        "tolerance": FIDELITY_TOL,
        "checked": len(mismatches),
        "max_loss_mismatch": worst if math.isfinite(worst) else None,
        "steps_over_tolerance": over,
        "note": note,
    }


#: per-step global series of the gradient check (``Analyser._gradient_check``)
STEP_SERIES = (
    "grad_norm",
    "recorded_grad_norm",
    "backward_grad_norm",
    "step_factor",
    "loss_scale",
    "clipped",
    "grad_norm_mismatch",
)


def earlier_step_rows(prev: Any) -> dict[int, dict[str, float]]:
    """The gradient-check values of the steps analysed before (appended analyses accumulate)."""
    if prev is None or "step_factor" not in prev.global_names:
        return {}
    cols = {k: prev.global_series(k) for k in STEP_SERIES if k in prev.global_names}
    return {
        int(st): {k: float(v[i]) for k, v in cols.items()}
        for i, st in enumerate(prev.steps)
        if np.isfinite(cols["step_factor"][i])
    }


def grad_fidelity(rows: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    """The gradient half of the fidelity check: steps whose recorded gradient norm no clipping or loss
    scaling explains (``grad_norm_mismatch`` over :data:`GRAD_NORM_TOL`)."""
    gaps = {s: r["grad_norm_mismatch"] for s, r in rows.items() if math.isfinite(r["grad_norm_mismatch"])}
    over = sorted(s for s, m in gaps.items() if m > GRAD_NORM_TOL)
    worst = max(gaps.values(), default=math.nan)
    note = None
    if over:
        note = (
            f"WARNING: the gradient the optimizer stepped with differs from the replayed gradient by up to "
            f"{100 * worst:.3g}% at {len(over)} of {len(gaps)} checkpoints (steps {_steps_text(over)}), and no "
            f"clipping (factor < 1) or loss scaling (a power of two) explains it: the gradient was changed in "
            f"the loop before optimizer.step, or the replay computes another loss"
        )
    return {
        "tolerance": GRAD_NORM_TOL,
        "checked": len(gaps),
        "max_mismatch": worst if math.isfinite(worst) else None,
        "steps_over_tolerance": over,
        "note": note,
    }


def step_changes(rows: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    """What changed the analysed steps, named: gradient clipping (how many steps, the smallest factor)
    and loss scaling (the scales seen)."""
    clipped = sorted(s for s, r in rows.items() if r["clipped"] == 1)
    factors = [rows[s]["step_factor"] for s in clipped]
    scaled = sorted(
        s
        for s, r in rows.items()
        if math.isfinite(r["loss_scale"]) and r["loss_scale"] != 1 and r["grad_norm_mismatch"] == 0
    )  # a mismatch's nearest power of two is no loss scale
    scales = sorted({rows[s]["loss_scale"] for s in scaled})
    notes = []
    if clipped:
        notes.append(
            f"gradient clipping: {len(clipped)} of {len(rows)} analysed steps were clipped (min factor "
            f"{min(factors):.4g}); their update maps and thresholds use the clipped gradient, the clip "
            f"factor frozen"
        )
    if scaled:
        notes.append(
            f"loss scaling: backward's gradient was scaled by {', '.join(f'{v:g}' for v in scales)} "
            f"(GradScaler) at {len(scaled)} of {len(rows)} analysed steps and unscaled before the step: "
            f"not a mismatch"
        )
    return {
        "checked": len(rows),
        "clipped_steps": clipped,
        "min_clip_factor": min(factors) if factors else None,
        "loss_scaled_steps": scaled,
        "loss_scales": scales,
        "notes": notes,
    }
