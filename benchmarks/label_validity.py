"""Label validity: do the node labels predict what a node does next? (issue #12)

    .venv/bin/python benchmarks/label_validity.py [--runs NAME ...] [--preset P ...] [--delta D ...]
        [--horizon K | --horizon-steps S] [--suite DIR] [--out DIR] [--stable] [--json PATH]

For every analysed checkpoint t and node i, an OUTCOME over the horizon t -> u is computed from the
recorded trajectory alone (θ_t, θ_{t+1}, θ_u, θ_{u+1}, the recorded lr, and gradients of the replayed loss
on one fixed evaluation batch), without looking at the labels or anything the analysis computed. Each
outcome is the truth for one label (docs/concepts.md, "What a label predicts: the validity benchmark"
gives the reasoning). With θ̄_s = (θ_s + θ_{s+1})/2 (period-2 oscillation averaged out) and the pace
= median over 3 analysed checkpoints of ‖θ_{s+1} − θ_s‖ / lr_s:

=================  =============================================================================
source             the node moves away: a non-finite parameter, or its pace after u is ≥ 2× its
                   pace up to t, or ‖θ̄_u‖ ≥ 2‖θ̄_t‖
degenerate_sink    it has collapsed and is still falling: ‖θ̄_u‖ ≤ 0.1‖θ̄_first‖ and ‖θ̄_u‖ ≤ ‖θ̄_t‖
plateau            the loss does not depend on what it does: dead (gradient ≤ 1e-6 × its layer's
                   largest, at t and at u), or the first-order loss change its move accounts for,
                   |½(g_t + g_u)·(θ̄_u − θ̄_t)|, is below 1/100 of an equal share (Σ_j|s_j|/N)
healthy_sink       none of these: it does not run away, has not collapsed, and the loss change its
                   move accounts for is real
=================  =============================================================================

The horizon u is the K-th next analysed checkpoint (``--horizon K``, default 1: the next one, i.e.
``every`` training steps later for a run recorded with window 2), or the first analysed checkpoint at
least S training steps later (``--horizon-steps S``); the pace after u looks 2 checkpoints further.
Checkpoints without a horizon end are not scored. Labels of each setting (preset, δ) come from
``trajscope.analyze(..., trust=True)`` of the suite runs (``benchmarks/validity_runs.py``), each into its
own folder holding a link to the recorded trajectory (the suite itself is never modified), cached under
``--out`` by setting and by a hash of the trajscope sources: change the rule, re-run this script, and
only the analyses are redone.

Prints the outcome counts and one markdown table per setting (run x label: precision / recall / support,
support = node-checkpoints whose outcome is that label) and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the suite's model_spec "benchmarks.validity_models:..." imports from the root
    sys.path.insert(0, str(ROOT))

import trajscope  # noqa: E402
from trajscope.io.results import open_results  # noqa: E402

LABELS = ("healthy_sink", "degenerate_sink", "plateau", "source")
HEALTHY, DEGENERATE, PLATEAU, SOURCE = range(4)
#: why an outcome is what it is; the first is "healthy", then in the order they are checked
TRUTH_REASONS = ("converging", "nonfinite", "step_growth", "norm_growth", "collapsed", "dead", "no_loss_share")
_TR = {name: i for i, name in enumerate(TRUTH_REASONS)}

DEFAULT_SUITE = ROOT / "benchmarks" / "results" / "validity_suite"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "label_validity"
#: (preset, delta) compared by default; delta None = the preset's own default (acted: min(1/T, 0.01))
DEFAULT_SETTINGS: tuple[tuple[str, float | None], ...] = (
    ("acted", None),
    ("seed", None),
    ("acted", 1e-3),
    ("acted", 1e-2),
    ("acted", 0.05),
    ("acted", 0.2),
)


# --------------------------------------------------------------------------- outcome definitions
@dataclass
class OutcomeConfig:
    """Thresholds of the outcomes (docs/concepts.md, "What a label predicts").

    horizon: analysed checkpoints ahead (u = the horizon-th next one); horizon_steps: if set, u is the
    first analysed checkpoint at least that many training steps after t (overrides horizon).
    pace_window: checkpoints whose median one-step move makes a pace (before: the last ones up to t;
    after: the first ones from u on).
    step_growth: source when pace_after ≥ step_growth · pace_before.
    norm_growth: source when ‖θ̄_u‖ ≥ norm_growth · ‖θ̄_t‖.
    collapse_ratio: degenerate when ‖θ̄_u‖ ≤ collapse_ratio · ‖θ̄_first‖ (the node's norm at the first
    analysed checkpoint) and ‖θ̄_u‖ ≤ ‖θ̄_t‖ (still falling, or at zero).
    share_min: a node's share of the loss change is real when |share| ≥ share_min × an equal share.
    dead_rel: dead when ‖g_i‖ ≤ dead_rel · max_j ‖g_j‖ over its layer, at t and at u.
    move_floor: a pace ≤ move_floor · ‖θ̄‖ / lr is no move at all (below float32 resolution).
    max_eval: samples in the evaluation batch when the run has no probe (distinct recorded batches).
    """

    horizon: int = 1
    horizon_steps: int | None = None
    pace_window: int = 3
    step_growth: float = 2.0
    norm_growth: float = 2.0
    collapse_ratio: float = 0.1
    share_min: float = 0.01
    dead_rel: float = 1e-6
    move_floor: float = 1e-7
    max_eval: int = 1024


def _norm(a: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sqrt((np.asarray(a, dtype=np.float64) ** 2).sum(axis=-1))


def midpoint(theta_s: np.ndarray, theta_s1: np.ndarray) -> np.ndarray:
    """θ̄_s = (θ_s + θ_{s+1}) / 2: the node's position at checkpoint s with a period-2 oscillation (the
    edge of stability, an lr above threshold) averaged out to first order."""
    return 0.5 * (np.asarray(theta_s, dtype=np.float64) + np.asarray(theta_s1, dtype=np.float64))


def pace(theta_s: np.ndarray, theta_s1: np.ndarray, lr: float | np.ndarray) -> np.ndarray:
    """‖θ_{s+1} − θ_s‖ / lr per node (N,): the recorded one-step move per unit learning rate, so that a
    change of the lr schedule alone is not a change of pace."""
    return _norm(np.asarray(theta_s1, dtype=np.float64) - np.asarray(theta_s, dtype=np.float64)) / np.asarray(
        lr, dtype=np.float64
    )


def node_quantities(
    pos_t: np.ndarray,
    pos_u: np.ndarray,
    grad_t: np.ndarray,
    grad_u: np.ndarray,
    pace_before: np.ndarray,
    pace_after: np.ndarray,
    first_norm: np.ndarray,
    finite: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-node measurements over one horizon t -> u.

    ``pos_*`` (N, p): positions θ̄ (:func:`midpoint`) at t and u; ``grad_*`` (N, p): ∇_{θ_i}L there on the
    evaluation batch; ``pace_before``/``pace_after`` (N,): median :func:`pace` around t and around u;
    ``first_norm`` (N,): ‖θ̄‖ at the first analysed checkpoint; ``finite`` (N,): every recorded parameter
    involved is finite (default: checked on the positions).

    Returns (N,) arrays: ``norm_t``, ``norm_u``, ``disp`` = ‖θ̄_u − θ̄_t‖, ``grad_t``/``grad_u`` = ‖g‖,
    ``share`` = −½(g_t + g_u)·(θ̄_u − θ̄_t) (the first-order loss decrease the node's move over the
    horizon accounts for: the trapezoid rule on the chord; summed over every parameter it is
    L(θ̄_t) − L(θ̄_u) up to third-order terms), ``pace_before``, ``pace_after``, ``first_norm``, ``finite``.
    """
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    pos_t, pos_u, grad_t, grad_u = map(f64, (pos_t, pos_u, grad_t, grad_u))
    with np.errstate(invalid="ignore", over="ignore"):
        if finite is None:
            finite = np.isfinite(pos_t).all(-1) & np.isfinite(pos_u).all(-1)
        d = pos_u - pos_t
        share = -0.5 * ((grad_t + grad_u) * d).sum(-1)
    return {
        "norm_t": _norm(pos_t),
        "norm_u": _norm(pos_u),
        "disp": _norm(d),
        "grad_t": _norm(grad_t),
        "grad_u": _norm(grad_u),
        "share": share,
        "pace_before": f64(pace_before),
        "pace_after": f64(pace_after),
        "first_norm": f64(first_norm),
        "finite": np.asarray(finite, dtype=bool),
    }


def equal_share(shares: Iterable[np.ndarray]) -> float:
    """An equal share of the horizon's first-order loss change: Σ_j |s_j| / N over every node of every layer."""
    shares = [np.asarray(s, dtype=np.float64).ravel() for s in shares]
    n = sum(s.size for s in shares)
    tot = sum(float(np.nansum(np.abs(s))) for s in shares)
    return tot / n if n else math.nan


def judge(
    q: Mapping[str, np.ndarray], fair: float, cfg: OutcomeConfig = OutcomeConfig(), lr: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(outcome uint8 (N,), reason uint8 (N,))`` of one layer's nodes over one horizon.

    ``q`` from :func:`node_quantities`; ``fair`` the equal share (:func:`equal_share`, over all nodes of
    all layers at this checkpoint); ``lr`` the learning rate the paces were divided by (for the floor).
    Checked in this order, the first that holds decides:

    1. source / nonfinite: a recorded parameter involved is NaN/Inf;
    2. source / step_growth: the node moved before (pace_before > move_floor·‖θ̄_t‖/lr) and
       pace_after ≥ step_growth · pace_before;
    3. source / norm_growth: ‖θ̄_u‖ ≥ norm_growth · ‖θ̄_t‖;
    4. degenerate_sink / collapsed: ‖θ̄_u‖ ≤ collapse_ratio · ‖θ̄_first‖ and ‖θ̄_u‖ ≤ ‖θ̄_t‖;
    5. plateau / dead: ‖g_t‖ ≤ dead_rel · max_layer ‖g_t‖ and the same at u;
    6. plateau / no_loss_share: |share| < share_min · fair: the node's move, whatever its size, changes
       the loss by less than share_min (1/100) of an equal share (or no node changed the loss at all);
    7. healthy_sink / converging otherwise.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        n = q["norm_t"].shape[0]
        out = np.full(n, HEALTHY, dtype=np.uint8)
        why = np.full(n, _TR["converging"], dtype=np.uint8)
        todo = np.ones(n, dtype=bool)

        def put(mask: np.ndarray, code: int, reason: str) -> None:
            m = todo & mask
            out[m], why[m] = code, _TR[reason]
            todo[m] = False

        put(~q["finite"], SOURCE, "nonfinite")
        moved = q["pace_before"] > cfg.move_floor * q["norm_t"] / lr
        put(moved & (q["pace_after"] >= cfg.step_growth * q["pace_before"]), SOURCE, "step_growth")
        put(q["norm_u"] >= cfg.norm_growth * q["norm_t"], SOURCE, "norm_growth")
        put(
            (q["norm_u"] <= cfg.collapse_ratio * q["first_norm"]) & (q["norm_u"] <= q["norm_t"]),
            DEGENERATE,
            "collapsed",
        )
        ref_t, ref_u = np.nanmax(q["grad_t"], initial=0.0), np.nanmax(q["grad_u"], initial=0.0)
        put((q["grad_t"] <= cfg.dead_rel * ref_t) & (q["grad_u"] <= cfg.dead_rel * ref_u), PLATEAU, "dead")
        real = (np.abs(q["share"]) >= cfg.share_min * fair) & (fair > 0)
        put(~real, PLATEAU, "no_loss_share")
    return out, why


# --------------------------------------------------------------------------- reading a trajectory
@dataclass
class NodeLayerDesc:
    name: str
    weight: str
    bias: str | None
    n: int


def node_layers(model: nn.Module) -> list[NodeLayerDesc]:
    """The Linear/Conv modules of ``model`` (nodes = their output units), in module order."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out.append(
                NodeLayerDesc(
                    name, f"{name}.weight", f"{name}.bias" if mod.bias is not None else None, int(mod.weight.shape[0])
                )
            )
    return out


def node_matrix(tensors: Mapping[str, torch.Tensor], layer: NodeLayerDesc) -> np.ndarray:
    """θ_i for every node of ``layer`` as rows: [W_i (flattened); b_i], float64 (N, p)."""
    w = tensors[layer.weight].detach().to(torch.float64).reshape(layer.n, -1)
    if layer.bias is not None:
        w = torch.cat([w, tensors[layer.bias].detach().to(torch.float64).reshape(layer.n, 1)], dim=1)
    return w.numpy()


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[k] for p in parts]) for k in range(len(first)))
    if isinstance(first, Mapping):
        return {k: _cat([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _leaves(v)]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _leaves(v)]
    return []


def _to64(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to64(v) for v in x)
    if isinstance(x, Mapping):
        return {k: _to64(v) for k, v in x.items()}
    return x


def _n_samples(batch: Any) -> int:
    leaves = _leaves(batch)
    return int(leaves[0].shape[0]) if leaves else 0


@dataclass
class CheckpointState:
    """What the outcomes need of one analysed checkpoint s (θ_s and θ_{s+1} recorded), per node layer."""

    pos: dict[str, np.ndarray]  # θ̄_s (N, p)
    grad: dict[str, np.ndarray]  # ∇L(θ̄_s) on the evaluation batch (N, p)
    pace: dict[str, np.ndarray]  # ‖θ_{s+1} − θ_s‖ / lr (N,)
    lr: dict[str, float]  # the lr of the layer's weight at step s
    finite: dict[str, np.ndarray]  # θ_s and θ_{s+1} finite (N,)
    loss: float  # L(θ̄_s) on the evaluation batch
    flat_pos: np.ndarray  # every parameter, for the first-order check
    flat_grad: np.ndarray


class Trajectory:
    """A recorded run as the outcomes need it: the analysed checkpoints (t with t+1 recorded), node
    positions, paces and replayed gradients on one fixed evaluation batch (float64)."""

    def __init__(self, path: str | Path, cfg: OutcomeConfig = OutcomeConfig(), trust: bool = True) -> None:
        self.run = trajscope.open_run(path)
        self.cfg = cfg
        self.model = self.run.model(trust=trust).to(torch.float64).eval()
        self.loss_fn = self.run.loss_fn(trust=trust)
        self.layers = node_layers(self.model)
        steps = [int(s) for s in self.run.steps]
        have = set(steps)
        self.pairs = [s for s in steps if s + 1 in have]  # the default analysis's checkpoints
        self.group_of = {name: g for g, names in enumerate(self.run.param_groups) for name in names}
        self.eval_batch, self.eval_source = self._eval_batch()

    def _eval_batch(self) -> tuple[Any, str]:
        probe = self.run.probe
        if probe is not None:
            return _to64(probe), f"the recorded probe ({_n_samples(probe)} samples)"
        parts, seen, n = [], set(), 0
        for s in self.pairs or [int(s) for s in self.run.steps]:
            b = self.run.checkpoint(s).batch
            if b is None:
                continue
            key = hashlib.sha1(b"".join(t.detach().contiguous().numpy().tobytes() for t in _leaves(b))).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            parts.append(b)
            n += _n_samples(b)
            if n >= self.cfg.max_eval:
                break
        if not parts:
            raise RuntimeError(f"{self.run.path} recorded no batch: no loss to evaluate")
        return _to64(_cat(parts)), f"{len(parts)} distinct recorded batch(es), {n} samples"

    def state(self, step: int) -> CheckpointState:
        """Positions, gradients and paces at the analysed checkpoint ``step`` (θ_step and θ_step+1)."""
        ck = self.run.checkpoint(step)
        nxt = self.run.params(step + 1)
        mid = {
            k: 0.5 * (v.detach().to(torch.float64) + nxt[k].detach().to(torch.float64)) if v.is_floating_point() else v
            for k, v in ck.params.items()
        }
        params = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in mid.items()}
        buffers = {k: _to64(v) for k, v in ck.buffers.items()}
        inputs, targets = self.eval_batch
        state = {**params, **buffers}
        with torch.enable_grad():
            if isinstance(inputs, Mapping):
                f = torch.func.functional_call(self.model, state, (), dict(inputs))
            elif isinstance(inputs, (tuple, list)):
                f = torch.func.functional_call(self.model, state, tuple(inputs))
            else:
                f = torch.func.functional_call(self.model, state, (inputs,))
            loss = self.loss_fn(f, targets)
            names = [k for k, v in params.items() if v.requires_grad]
            gl = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
        grads = {k: (g.detach() if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, gl)}
        lr = {}
        for l in self.layers:
            g = self.group_of.get(l.weight, 0)
            lr[l.name] = float(ck.hparams[g].get("lr", 1.0)) if g < len(ck.hparams) else 1.0
        pos, grad, pc, fin = {}, {}, {}, {}
        for l in self.layers:
            a, b = node_matrix(ck.params, l), node_matrix(nxt, l)
            with np.errstate(invalid="ignore", over="ignore"):
                fin[l.name] = np.isfinite(a).all(-1) & np.isfinite(b).all(-1)
            pos[l.name] = midpoint(a, b)
            pc[l.name] = pace(a, b, lr[l.name] if lr[l.name] > 0 else 1.0)
            grad[l.name] = node_matrix(grads, l)
        flat_p = torch.cat([params[k].detach().reshape(-1) for k in names]).numpy() if names else np.zeros(0)
        flat_g = torch.cat([grads[k].reshape(-1) for k in names]).numpy() if names else np.zeros(0)
        return CheckpointState(pos, grad, pc, lr, fin, float(loss.detach()), flat_p, flat_g)

    def horizon_of(self, k: int) -> int | None:
        """Index into ``pairs`` of the horizon end u for the checkpoint pairs[k], or None."""
        if self.cfg.horizon_steps is not None:
            t = self.pairs[k]
            for j in range(k + 1, len(self.pairs)):
                if self.pairs[j] >= t + self.cfg.horizon_steps:
                    return j
            return None
        j = k + self.cfg.horizon
        return j if j < len(self.pairs) else None


@dataclass
class Outcomes:
    """The outcome of every scored (checkpoint, node): ``truth[layer]`` (K, N) uint8, ``reason[layer]``,
    the measurements ``quantities[layer][name]`` (K, N), ``steps`` (K,) and their horizon ends ``until``."""

    steps: np.ndarray
    until: np.ndarray
    truth: dict[str, np.ndarray]
    reason: dict[str, np.ndarray]
    quantities: dict[str, dict[str, np.ndarray]]
    loss_t: np.ndarray  # L(θ̄_t), L(θ̄_u) on the evaluation batch
    loss_u: np.ndarray
    node_first_order: np.ndarray  # Σ over all nodes of the share
    first_order: np.ndarray  # the same over every parameter (≈ loss_t − loss_u)
    eval_source: str
    layers: dict[str, int] = field(default_factory=dict)


def compute_outcomes(path: str | Path, cfg: OutcomeConfig = OutcomeConfig(), trust: bool = True) -> Outcomes:
    """Outcomes of every analysed checkpoint of the run at ``path`` that has a horizon end (see module doc)."""
    tr = Trajectory(path, cfg, trust)
    P = tr.pairs
    names = [l.name for l in tr.layers]
    states = [tr.state(s) for s in P]
    first_norm = {n: _norm(states[0].pos[n]) for n in names} if states else {}
    m = max(1, cfg.pace_window)
    rows = []
    for k, t in enumerate(P):
        j = tr.horizon_of(k)
        if j is None:
            continue
        a, b = states[k], states[j]
        qs, judged = {}, {}
        for n in names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices of a diverged run
                before = np.nanmedian(np.stack([states[i].pace[n] for i in range(max(0, k - m + 1), k + 1)]), axis=0)
                after = np.nanmedian(np.stack([states[i].pace[n] for i in range(j, min(len(P), j + m))]), axis=0)
            qs[n] = node_quantities(
                a.pos[n], b.pos[n], a.grad[n], b.grad[n], before, after, first_norm[n], a.finite[n] & b.finite[n]
            )
        fair = equal_share(q["share"] for q in qs.values())
        for n in names:
            judged[n] = judge(qs[n], fair, cfg, a.lr[n] if a.lr[n] > 0 else 1.0)
        node_fo = sum(float(np.nansum(q["share"])) for q in qs.values())
        with np.errstate(invalid="ignore", over="ignore"):
            fo = float(-0.5 * np.dot(a.flat_grad + b.flat_grad, b.flat_pos - a.flat_pos))
        rows.append((t, P[j], qs, judged, a.loss, b.loss, node_fo, fo))
    K = len(rows)
    empty = np.zeros((0, 0), np.uint8)
    truth = {n: np.stack([r[3][n][0] for r in rows]) if K else empty for n in names}
    reason = {n: np.stack([r[3][n][1] for r in rows]) if K else empty for n in names}
    quantities = {n: {key: np.stack([r[2][n][key] for r in rows]) for key in rows[0][2][n]} if K else {} for n in names}
    col = lambda i: np.array([r[i] for r in rows], dtype=np.float64)  # noqa: E731
    return Outcomes(
        steps=np.array([r[0] for r in rows], dtype=np.int64),
        until=np.array([r[1] for r in rows], dtype=np.int64),
        truth=truth,
        reason=reason,
        quantities=quantities,
        loss_t=col(4),
        loss_u=col(5),
        node_first_order=col(6),
        first_order=col(7),
        eval_source=tr.eval_source,
        layers={l.name: l.n for l in tr.layers},
    )


# --------------------------------------------------------------------------- scoring
def confusion(
    truth: Mapping[str, np.ndarray], truth_steps: np.ndarray, labels: Mapping[str, np.ndarray], label_steps: np.ndarray
) -> np.ndarray:
    """4 × 4 counts, rows = outcome, columns = label, over the steps both have and every node whose label
    was computed (label codes 0-3)."""
    cm = np.zeros((4, 4), dtype=np.int64)
    pos = {int(s): i for i, s in enumerate(label_steps)}
    for layer, tr in truth.items():
        if layer not in labels:
            continue
        lab = labels[layer]
        for k, s in enumerate(truth_steps):
            i = pos.get(int(s))
            if i is None:
                continue
            ok = lab[i] < 4
            np.add.at(cm, (tr[k][ok].astype(np.int64), lab[i][ok].astype(np.int64)), 1)
    return cm


def scores(cm: np.ndarray) -> dict[str, dict[str, float]]:
    """Per label: precision (of the nodes given the label, the fraction whose outcome is it), recall (of
    the nodes with that outcome, the fraction given the label), support (nodes with that outcome) and
    predicted (nodes given the label). NaN where undefined."""
    out = {}
    for c, name in enumerate(LABELS):
        tp, pred, sup = int(cm[c, c]), int(cm[:, c].sum()), int(cm[c, :].sum())
        out[name] = {
            "precision": tp / pred if pred else math.nan,
            "recall": tp / sup if sup else math.nan,
            "support": sup,
            "predicted": pred,
        }
    return out


def accuracy(cm: np.ndarray) -> float:
    n = cm.sum()
    return float(np.trace(cm) / n) if n else math.nan


# --------------------------------------------------------------------------- analyses per setting
def code_hash() -> str:
    """A hash of the trajscope sources: a changed rule invalidates cached analyses."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "trajscope").rglob("*.py")):
        h.update(p.relative_to(ROOT).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def setting_name(preset: str, delta: float | None) -> str:
    return f"{preset}, delta={'default' if delta is None else f'{delta:g}'}"


def analyse_setting(
    run: Path,
    name: str,
    preset: str,
    delta: float | None,
    options: Mapping[str, Any],
    out: Path,
    code: str,
    sharpness: bool = False,
) -> Path:
    """Analyse ``run`` under one label setting into its own folder and return that folder.

    The folder, ``OUT/analyses/<code>/<preset>_<delta>/<name>``, holds a link to the run's
    trajectory.zarr (the suite run is never written to) and the analysis; it is reused while the trajscope
    sources (``code``), the options and the recorded run are the same (``settings.json`` says which),
    and rebuilt otherwise.
    """
    rec = (run / "trajectory.zarr").resolve()
    expect = {
        "preset": preset,
        "delta": delta,
        "sharpness": sharpness,
        "options": dict(options),
        "run": str(rec),
        "run_mtime_ns": (rec / "zarr.json").stat().st_mtime_ns,
        "trajscope_code": code,
    }
    work = out / "analyses" / code / f"{preset}_{'default' if delta is None else f'{delta:g}'}" / name
    meta = work / "settings.json"
    if work.exists() and (not meta.exists() or json.loads(meta.read_text()) != json.loads(json.dumps(expect))):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    link = work / "trajectory.zarr"
    if not link.exists():
        os.symlink(rec, link, target_is_directory=True)
    meta.write_text(json.dumps(expect, indent=1) + "\n")
    kw = dict(options)
    if delta is not None:
        kw["delta"] = delta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trajscope.analyze(work, trust=True, preset=preset, sharpness=sharpness, **kw)
    return work


def read_labels(
    work: Path, stable: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """``(steps, label per layer, reason code per layer, reason names)`` of an analysis."""
    res = open_results(work)
    metric = "stable_label" if stable else "label"
    names = list(res.attrs.get("reasons") or [])
    reasons = (
        {l: np.asarray(res.node(l, "reason")) for l in res.layers}
        if "reason" in res.metrics(next(iter(res.layers)))
        else {}
    )
    return np.asarray(res.steps), {l: np.asarray(res.node(l, metric)) for l in res.layers}, reasons, names


def by_reason(
    truth: Mapping[str, np.ndarray],
    truth_steps: np.ndarray,
    labels: Mapping[str, np.ndarray],
    reasons: Mapping[str, np.ndarray],
    reason_names: Sequence[str],
    label_steps: np.ndarray,
) -> dict[str, dict[str, int]]:
    """``{"<label>/<reason>": {outcome: count}}``: which branch of the rule fired, and what followed."""
    out: dict[str, dict[str, int]] = {}
    pos = {int(s): i for i, s in enumerate(label_steps)}
    for layer, tr in truth.items():
        if layer not in labels or layer not in reasons:
            continue
        for k, s in enumerate(truth_steps):
            i = pos.get(int(s))
            if i is None:
                continue
            lab, why = labels[layer][i], reasons[layer][i]
            for l_code, r_code, t_code in zip(lab.tolist(), why.tolist(), tr[k].tolist()):
                if l_code >= 4:
                    continue
                rname = reason_names[r_code] if r_code < len(reason_names) else str(r_code)
                row = out.setdefault(f"{LABELS[l_code]}/{rname}", {n: 0 for n in LABELS})
                row[LABELS[t_code]] += 1
    return out


def reason_table(rows: Mapping[str, Mapping[str, int]]) -> str:
    """``| label / reason | n | outcome healthy_sink | ... |`` in percent of the row."""
    lines = [
        "| label / reason (rule branch) | n | " + " | ".join(f"→ {n}" for n in LABELS) + " |",
        "|---|---|" + "---|" * len(LABELS),
    ]
    for key in sorted(rows, key=lambda k: (LABELS.index(k.split("/")[0]), k)):
        n = sum(rows[key].values())
        lines.append(f"| {key} | {n} | " + " | ".join(f"{100 * rows[key][c] / n:.0f}%" for c in LABELS) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report
def _cell(s: Mapping[str, float]) -> str:
    f = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    return f"{f(s['precision'])} / {f(s['recall'])} / {s['support']}"


def markdown_table(
    per_run: Mapping[str, Mapping[str, Mapping[str, float]]], acc: Mapping[str, float] | None = None
) -> str:
    """``| run | healthy_sink | degenerate_sink | plateau | source | accuracy |`` with P / R / support cells."""
    head = "| run | " + " | ".join(LABELS) + (" | accuracy |" if acc is not None else " |")
    sep = "|---|" + "---|" * (len(LABELS) + (acc is not None))
    lines = [head, sep]
    for run, sc in per_run.items():
        cells = [_cell(sc[name]) for name in LABELS]
        if acc is not None:
            cells.append("–" if math.isnan(acc[run]) else f"{acc[run]:.2f}")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def outcome_table(outs: Mapping[str, Outcomes]) -> str:
    """Per run: node-checkpoints per outcome reason, and how well the first-order shares add up."""
    head = "| run | scored | horizon (steps) | " + " | ".join(TRUTH_REASONS) + " | first order / ΔL | nodes' part |"
    lines = [head, "|---|---|---|" + "---|" * len(TRUTH_REASONS) + "---|---|"]
    for run, o in outs.items():
        counts = np.zeros(len(TRUTH_REASONS), dtype=np.int64)
        for r in o.reason.values():
            counts += np.bincount(r.ravel(), minlength=len(TRUTH_REASONS))[: len(TRUTH_REASONS)]
        dl = o.loss_t - o.loss_u
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.nanmedian(o.first_order / dl) if len(dl) else math.nan
            node_ratio = np.nanmedian(o.node_first_order / o.first_order) if len(dl) else math.nan
        gap = np.median(o.until - o.steps) if len(o.steps) else math.nan
        lines.append(
            f"| {run} | {int(counts.sum())} | {gap:g} | "
            + " | ".join(str(int(c)) for c in counts)
            + f" | {ratio:.2f} | {node_ratio:.2f} |"
        )
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return _jsonable(float(x))
    return x


def evaluate(
    suite: Mapping[str, Path],
    settings: Sequence[tuple[str, float | None]],
    cfg: OutcomeConfig,
    out: Path,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    stable: bool = False,
    sharpness: bool = False,
    log=print,
) -> dict[str, Any]:
    """Score every setting on every run. Returns the report (what the JSON holds)."""
    options = options or {}
    code = code_hash()
    t0 = time.perf_counter()
    outs: dict[str, Outcomes] = {}
    for name, run in suite.items():
        t1 = time.perf_counter()
        outs[name] = compute_outcomes(run, cfg)
        log(
            f"outcomes {name}: {len(outs[name].steps)} checkpoints, eval batch = {outs[name].eval_source} "
            f"({time.perf_counter() - t1:.1f} s)"
        )
    report: dict[str, Any] = {
        "outcome_config": asdict(cfg),
        "labels": list(LABELS),
        "truth_reasons": list(TRUTH_REASONS),
        "score": "stable_label" if stable else "label",
        "trajscope_code": code,
        "settings": {},
        "outcomes": {},
        "outcome_seconds": time.perf_counter() - t0,
    }
    for name, o in outs.items():
        counts = {r: 0 for r in TRUTH_REASONS}
        for arr in o.reason.values():
            for i, c in enumerate(np.bincount(arr.ravel(), minlength=len(TRUTH_REASONS))[: len(TRUTH_REASONS)]):
                counts[TRUTH_REASONS[i]] += int(c)
        report["outcomes"][name] = {
            "checkpoints": len(o.steps),
            "eval_batch": o.eval_source,
            "reasons": counts,
            "horizon_steps_median": float(np.median(o.until - o.steps)) if len(o.steps) else None,
        }
    for preset, delta in settings:
        sname = setting_name(preset, delta)
        t1 = time.perf_counter()
        per_run, accs, cms, deltas, why, why_all = {}, {}, {}, {}, {}, {}
        total = np.zeros((4, 4), dtype=np.int64)
        for name, run in suite.items():
            work = analyse_setting(run, name, preset, delta, options.get(name, {}), out, code, sharpness)
            steps, labels, reasons, rnames = read_labels(work, stable)
            cm = confusion(outs[name].truth, outs[name].steps, labels, steps)
            total += cm
            per_run[name], accs[name], cms[name] = scores(cm), accuracy(cm), cm.tolist()
            deltas[name] = float(open_results(work).attrs.get("delta", math.nan))
            if not stable:  # reasons explain the instantaneous label
                why[name] = by_reason(outs[name].truth, outs[name].steps, labels, reasons, rnames, steps)
                for key, row in why[name].items():
                    acc_row = why_all.setdefault(key, {n: 0 for n in LABELS})
                    for c, v in row.items():
                        acc_row[c] += v
        per_run["all runs"], accs["all runs"], cms["all runs"] = scores(total), accuracy(total), total.tolist()
        why["all runs"] = why_all
        report["settings"][sname] = {
            "preset": preset,
            "delta": delta,
            "delta_used": deltas,
            "scores": per_run,
            "accuracy": accs,
            "confusion": cms,
            "by_reason": why,
            "seconds": time.perf_counter() - t1,
        }
        log(f"setting {sname}: {time.perf_counter() - t1:.1f} s")
    report["seconds"] = time.perf_counter() - t0
    report["_tables"] = {
        "outcomes": outcome_table(outs),
        **{s: markdown_table(v["scores"], v["accuracy"]) for s, v in report["settings"].items()},
        **{
            f"{s} by reason": reason_table(v["by_reason"]["all runs"])
            for s, v in report["settings"].items()
            if v["by_reason"].get("all runs")
        },
    }
    return report


def print_report(report: Mapping[str, Any], file=sys.stdout) -> None:
    cfg = report["outcome_config"]
    hz = (
        f"{cfg['horizon_steps']} training steps" if cfg["horizon_steps"] else f"{cfg['horizon']} analysed checkpoint(s)"
    )
    print(f"## Outcomes (horizon: {hz} ahead; node-checkpoints by outcome reason)\n", file=file)
    print(
        f"Thresholds: pace window {cfg['pace_window']}, step growth {cfg['step_growth']:g}, norm growth "
        f"{cfg['norm_growth']:g}, collapse ratio {cfg['collapse_ratio']:g}, share min {cfg['share_min']:g}, "
        f'dead {cfg["dead_rel"]:g} (docs/concepts.md, "What a label predicts").\n',
        file=file,
    )
    print(report["_tables"]["outcomes"] + "\n", file=file)
    for sname, v in report["settings"].items():
        used = sorted({f"{d:.3g}" for d in v["delta_used"].values()})
        print(
            f"## {sname} (delta used: {', '.join(used)}; {report['score']}): precision / recall / support\n", file=file
        )
        print(report["_tables"][sname] + "\n", file=file)
        if f"{sname} by reason" in report["_tables"]:
            print(f"What followed each branch of the rule ({sname}, all runs; row percentages):\n", file=file)
            print(report["_tables"][f"{sname} by reason"] + "\n", file=file)
    print(f"total {report['seconds']:.0f} s", file=file)


def _parse_delta(text: str) -> float | None:
    if text in ("default", "none", "None"):
        return None
    v = float(text)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"delta must be a finite number >= 0 or 'default', got {text!r}")
    return v


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.validity_runs import SUITE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", metavar="NAME", help=f"suite runs to score (default all: {', '.join(SUITE)})")
    ap.add_argument("--preset", nargs="+", metavar="P", help="label presets (acted, seed, ...)")
    ap.add_argument("--delta", nargs="+", type=_parse_delta, metavar="D", help="deltas, or 'default'")
    ap.add_argument("--horizon", type=int, default=1, help="analysed checkpoints ahead (default 1: the next)")
    ap.add_argument(
        "--horizon-steps",
        type=int,
        default=None,
        help="training steps ahead instead (first analysed checkpoint at least this far)",
    )
    ap.add_argument("--suite", default=str(DEFAULT_SUITE), help="folder of the suite runs (made there if missing)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder for cached analyses and the JSON")
    ap.add_argument("--json", default=None, help="where to write the numbers (default OUT/label_validity.json)")
    ap.add_argument("--stable", action="store_true", help="score the stable label instead of the instantaneous one")
    ap.add_argument(
        "--sharpness",
        action="store_true",
        help="let the analyses compute the Lanczos sharpness (off: labels do not use it)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: these models are tiny)")
    d = OutcomeConfig()
    ap.add_argument(
        "--pace-window", type=int, default=d.pace_window, help=f"checkpoints per pace median (default {d.pace_window})"
    )
    ap.add_argument(
        "--step-growth",
        type=float,
        default=d.step_growth,
        help=f"source: pace after / before at least this (default {d.step_growth:g})",
    )
    ap.add_argument(
        "--norm-growth",
        type=float,
        default=d.norm_growth,
        help=f"source: norm ratio at least this (default {d.norm_growth:g})",
    )
    ap.add_argument(
        "--outcome-collapse-ratio",
        type=float,
        default=d.collapse_ratio,
        help=f"degenerate: norm at most this x the first norm (default {d.collapse_ratio:g})",
    )
    ap.add_argument(
        "--share-min",
        type=float,
        default=d.share_min,
        help=f"plateau: |share| below this x an equal share (default {d.share_min:g})",
    )
    args = ap.parse_args(argv)
    if args.horizon < 1 or (args.horizon_steps is not None and args.horizon_steps < 1):
        ap.error("the horizon is at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.validity_runs import SUITE, make_suite

    if args.preset is None and args.delta is None:
        settings = list(DEFAULT_SETTINGS)
    else:
        settings = [(p, d) for p in (args.preset or ["acted"]) for d in (args.delta or [None])]
    names = args.runs or list(SUITE)
    t0 = time.perf_counter()
    suite = make_suite(args.suite, names)
    print(f"suite ready in {args.suite} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    cfg = OutcomeConfig(
        horizon=args.horizon,
        horizon_steps=args.horizon_steps,
        pace_window=max(1, args.pace_window),
        step_growth=args.step_growth,
        norm_growth=args.norm_growth,
        collapse_ratio=args.outcome_collapse_ratio,
        share_min=args.share_min,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate(
        suite,
        settings,
        cfg,
        out,
        {n: SUITE[n][1] for n in names},
        stable=args.stable,
        sharpness=args.sharpness,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print_report(report)
    path = Path(args.json) if args.json else out / "label_validity.json"
    path.write_text(json.dumps(_jsonable({k: v for k, v in report.items() if k != "_tables"}), indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
