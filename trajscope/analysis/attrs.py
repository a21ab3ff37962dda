"""The attributes of ``RUN/analysis.zarr`` written at a run's first analysis: what was computed, how, and
what each series means (``semantics``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import trajscope
from trajscope.analysis.layer import NOT_COMPUTED
from trajscope.analysis.options import AnalysisOptions
from trajscope.dynamics.labels import LABELS, REASONS
from trajscope.replay.run import Run


def result_attrs(
    run: Run, an: Any, opts: AnalysisOptions, rules0: Sequence[Any], maps0: Mapping[str, str | None]
) -> dict[str, Any]:
    """The results attributes of ``run``'s analysis by ``an`` (a :class:`~trajscope.analysis.checkpoint.Analyser`)
    under ``opts``; ``rules0`` / ``maps0`` the update rules and per-layer map notes of its first checkpoint."""
    return {
        "trajscope_version": trajscope.__version__,
        "labels": list(LABELS),
        "reasons": list(REASONS),
        "not_computed_code": NOT_COMPUTED,
        "curvature": opts.curvature,
        "batch": opts.batch,
        "dtype": opts.dtype,
        "train_mode": opts.train_mode,
        "delta": an.delta,
        "total_steps_at_first_analysis": an.total_steps,
        "label_horizon": an.horizon,
        "label_config": {k: v for k, v in vars(opts.labels).items()},
        "optimizer": run.optimizer_class,
        "optimizer_map": [{"kind": r.kind, "note": r.note} for r in rules0],
        "kinematics_only": an.kinematics_only,
        "loss_override": an.loss_override,
        "semantics": {
            "step": "training step t of the checkpoint; theta_t is the parameters just before update t",
            "hess_max/hess_min": "extreme eigenvalues of the node curvature block H_i (GGN or exact, see 'curvature')",
            "spectral_radius": "max |mu| of the node's linearised update map (all directions)",
            "rho": "per-step decay ratio (||theta_{t+k}|| / ||theta_t||)^(1/k)",
            "drift": "||u_{t+k} - u_t||, u = theta/||theta|| (a k-step drift when checkpoints are k apart)",
            "step_gap": "k, the steps between the checkpoint and the successor that rho and drift use "
            "(global/step_gap; NaN without a successor)",
            "null_dims": "directions the step does not act on (mu exactly 1)",
            "loss_mismatch": "|replayed loss - recorded loss| / |recorded loss| at the step (the fidelity check; "
            "attribute 'fidelity' summarises it)",
            "grad_norm": "||grad L(theta_t)||, the replayed gradient over the parameters the optimizer steps",
            "recorded_grad_norm": "||g|| the optimizer stepped with (recorded at optimizer.step: after unscaling and "
            "clipping)",
            "backward_grad_norm": "||g|| as backward accumulated it (recorded; loss-scaled, before clipping)",
            "step_factor": "c_t = recorded_grad_norm / grad_norm (< 1: clipped; the map of a clipped step uses "
            "c_t * H with c_t frozen)",
            "loss_scale": "backward_grad_norm / grad_norm rounded to a power of two (GradScaler's scale; 1: none)",
            "clipped": "1 where the step was clipped (0 < c_t < 1 - tolerance, backward explained)",
            "grad_norm_mismatch": "relative gradient-norm gap no clipping or loss scaling explains (attribute "
            "'fidelity'.grad_norm summarises it; 'step_changes' the clipping and scaling)",
            "neutral_dims": "acted-on directions with ||mu| - 1| <= delta",
            "motion_radius": "max |mu_u| of the update map along the node's recorded motion u = theta_next - theta "
            "(lambda_u = u'Au/u'u; the excited preset's source test; NaN when the node has no motion)",
            "loss_share": "-g_i.u_i, the node's first-order loss decrease at the step, over an equal share "
            "(mean |g_j.u_j| over every node of every layer): below label_config.share_min with a "
            "flat motion the excited preset calls it a plateau",
            "threshold": "curvature at which the optimizer's map loses stability (min over param groups); "
            "for Adam compare with precond_sharpness, lambda_max of P^{1/2}(H + coupled wd)P^{1/2}",
        },
        "layer_info": {
            l.name: {
                "kind": l.kind,
                "n_nodes": l.n_nodes,
                "node_dim": l.node_dim,
                **({"map_note": maps0[l.name]} if maps0[l.name] else {}),
            }
            for l in an.layers
        },
    }
