"""``trajscope analyze``: replay each recorded checkpoint and compute SPEC §3–§8, write SPEC §9.

For every analysed checkpoint t (θ_t, its mini-batch, its optimizer state):

1. replay the model with θ_t substituted functionally on the step's batch (or the probe), the modules that
   trained in train mode as they trained (:mod:`trajscope.replay.trainmode`; ``--train-mode off``: eval mode);
2. per node layer: curvature blocks H_i (GGN or exact) and their spectra, node gradients;
3. per node: update-map spectrum for the recorded optimizer and hyperparameters (Adam: second
   moment frozen), kinematics against θ_{t+k}, label, stable label;
4. global: loss, sharpness (Lanczos), the optimizer's stability threshold; the fidelity check
   (replayed against recorded loss, and ‖∇L(θ_t)‖ against the recorded gradient norms: the step
   factor c_t, loss scaling, clipping — a clipped step's maps use c_t·H — or a mismatch);
5. append one row to ``RUN/analysis.zarr`` and one step to the TensorBoard events in ``RUN/``.

Train/eval-only layers: by default replay runs every forward pass of a checkpoint as the recorded step ran it
(per micro-batch: the modules' train/eval flags, BatchNorm on batch statistics, dropout with the recorded RNG
state), so curvature is that of the function that was trained, a deterministic function of θ for that step.
``--train-mode off`` runs the model in eval mode (dropout off; BatchNorm on the recorded running statistics).
"""
from __future__ import annotations

import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import trajscope
from trajscope.curvature.spectra import bias_group_eigvals, node_hessian_extremes, preconditioned_eigvals
from trajscope.curvature.node import CurvatureResult, node_curvature
from trajscope.dynamics.kinematics import node_kinematics
from trajscope.dynamics.motion import map_scale, motion_curvature, motion_fractions, motion_from_eigs
from trajscope.dynamics.labels import (LABELS, REASONS, LabelConfig, classify, collapse_reference_norm, resolve_delta,
                                      stable_labels)
from trajscope.nodes import NodeLayer, matches, node_matrix
from trajscope.analysis.options import AnalysisOptions, parse_steps, range_text
from trajscope.replay import trainmode as replay_mod
from trajscope.replay.problem import Problem
from trajscope.curvature.sharpness import sharpness as compute_sharpness
from trajscope.io.tbevents import EventWriter
from trajscope.dynamics.updatemap import (GRAD_NORM_TOL, NodeMap, UpdateRule, node_map, node_update_spectra,
                                          preconditioner, stability_threshold, step_gradient, update_rule)
from trajscope.errors import DamagedRecordError, TrajscopeError
from trajscope.io.results import (NODE_FLOAT, NODE_INT, NODE_U8, UNSET_INT, ResultsWriter, discard_partial_stores, open_results,
                               results_exist)
from trajscope.replay.run import Checkpoint, Run, open_run
from trajscope.io.runlock import analysis_lock
from trajscope.trust import loss_spec
from trajscope.io.trajectory import find_runs

NOT_COMPUTED = 255  # label code written when a run has no batches (kinematics only)


@dataclass
class RunSummary:
    run: Path
    analysed: list[int]
    results: Any
    kinematics_only: bool = False
    notes: list[str] = field(default_factory=list)
    mismatches: dict[int, float] = field(default_factory=dict)   # step -> relative replayed/recorded loss gap
    step_rows: dict[int, dict[str, float]] = field(default_factory=dict)   # step -> STEP_SERIES values


# --------------------------------------------------------------------------- node layers
def recorded_node_layers(run: Run, include: Sequence[str] | None = None) -> list[NodeLayer]:
    """Node layers from the table the Recorder wrote (works for import-spec and exported models)."""
    table = run.attrs["model"].get("node_layers", [])
    out = [NodeLayer(**{**d, "conv": _tuples(d["conv"])}) for d in table if not include or matches(d["name"], include)]
    if include and not out:
        names = [d["name"] for d in table]
        raise TrajscopeError(f"--modules {' '.join(include)} matches no Linear/Conv module of the run "
                             f"(it has: {', '.join(names) or 'none'})")
    return out


def _tuples(obj: Any) -> Any:
    """JSON turned the conv geometry's tuples into lists; NodeLayer wants them back."""
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- step selection
def eligible_steps(run: Run, opts: AnalysisOptions, done: Sequence[int]) -> list[tuple[int, int | None]]:
    """(step, successor step) pairs to analyse, in order, after the steps already analysed.

    By default a checkpoint is analysed when θ_{t+1} is recorded too (the window's leading steps), so
    ρ and drift are exact one-step quantities; with ``all_steps`` (or when no such pair exists) every
    checkpoint is analysed and kinematics span the gap to the next recorded step.
    """
    steps = [int(s) for s in run.steps]
    nxt = {s: (steps[i + 1] if i + 1 < len(steps) else None) for i, s in enumerate(steps)}
    pairs = [(s, nxt[s]) for s in steps if nxt[s] == s + 1]
    if opts.all_steps or not pairs:
        pairs = [(s, nxt[s]) for s in steps]
    if opts.steps:
        lo, hi = opts.steps
        pairs = [(s, n) for s, n in pairs if (lo is None or s >= lo) and (hi is None or s < hi)]
    pairs = pairs[:: max(1, opts.stride)]
    last = max(done) if done else None
    return [(s, n) for s, n in pairs if last is None or s > last]


# --------------------------------------------------------------------------- one checkpoint
def _to(x: Any, device: str, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.to(device)
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_to(v, device, dtype) for v in x)
    if isinstance(x, list):
        return [_to(v, device, dtype) for v in x]
    if isinstance(x, Mapping):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    return x


def _finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class _Analyser:
    """Analyses the checkpoints of one run; holds what is shared between them."""

    def __init__(self, run: Run, opts: AnalysisOptions) -> None:
        self.run, self.opts = run, opts
        self.dtype = getattr(torch, opts.dtype)
        self.layers = recorded_node_layers(run, opts.modules)
        if not self.layers:
            raise TrajscopeError(f"{run.path}: the model has no Linear/Conv layer, so there are no nodes to analyse")
        self.kinematics_only = not run.has_batches and not (opts.batch == "probe" and run.probe is not None)
        if opts.batch == "probe" and run.probe is None:
            raise TrajscopeError(f"{run.path} has no probe batch: record one with Recorder(probe=...) or use --batch step")
        self.model = None
        self.loss_fn: Callable | None = None
        self.loss_override: str | None = None
        if not self.kinematics_only:
            self.model = run.model(opts.model, opts.model_args, trust=opts.trust).to(opts.device).to(self.dtype)
            self.loss_fn = run.loss_fn(opts.loss, opts.loss_args, trust=opts.trust)
            self.loss_override = _loss_override(run, opts.loss, self.loss_fn)
            if isinstance(self.loss_fn, torch.nn.Module):
                self.loss_fn = self.loss_fn.to(opts.device)
        meta = run.attrs["model"]
        self.exported = opts.model is None and not meta.get("spec") and bool(meta.get("exported"))
        self.compiled = "OptimizedModule" in (meta.get("wrapped_by") or [])
        self.recorded_sensitive = meta.get("mode_sensitive") or []
        self.replay_issues: dict[str, list[int]] = {}     # why a replay departs from training -> steps
        self.coupled = False                              # some checkpoint used the coupled curvature route
        self.n_replayed = 0                               # checkpoints replayed per recorded forward pass
        self.group_of = {name: g for g, names in enumerate(run.param_groups) for name in names}
        self.total_steps = int(run.steps[-1]) + 1 if len(run.steps) else 1
        self.horizon = _horizon(run, opts)
        self.delta = resolve_delta(opts.labels, self.total_steps, self.horizon)
        self.failures: list[str] = []   # a part of one checkpoint that failed (its values NaN): summary lines

    def replay(self, ck: Checkpoint, inputs: Any) -> replay_mod.Replay:
        """How checkpoint ``ck`` is replayed on ``inputs``; a departure from training is kept for the summary."""
        rp, issue = replay_mod.plan(self.model, ck.forward, inputs, self.opts.device, mode=self.opts.train_mode,
                                    exported=self.exported, compiled=self.compiled,
                                    probe=self.opts.batch == "probe", recorded_sensitive=self.recorded_sensitive)
        if issue:
            self.replay_issues.setdefault(issue, []).append(ck.step)
        self.n_replayed += bool(rp.micro)
        return rp

    def _failed(self, message: str) -> None:
        """A warning now and a line in the summary: one part of one checkpoint could not be computed."""
        warnings.warn(message)
        self.failures.append(message)

    def preflight(self, ck: Checkpoint) -> None:
        """Replay the loss once before anything is written: a model or loss that cannot be evaluated on
        the recorded batch is one line for the whole run, not a failed row per checkpoint."""
        batch = self.run.probe if self.opts.batch == "probe" else ck.batch
        dev, dt = self.opts.device, self.dtype
        params = {k: _to(v, dev, dt) for k, v in ck.params.items()}
        buffers = {k: _to(v, dev, dt) for k, v in ck.buffers.items()}
        inputs = _to(batch[0], dev, dt)
        rp, _ = replay_mod.plan(self.model, ck.forward, inputs, dev, mode=self.opts.train_mode,
                                exported=self.exported, compiled=self.compiled,
                                probe=self.opts.batch == "probe", recorded_sensitive=self.recorded_sensitive)
        try:
            with torch.no_grad():
                loss = self.loss_fn(rp.forward(self.model, params, buffers, inputs), _to(batch[1], dev, dt))
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise TypeError(f"it returned {type(loss).__name__}"
                                f"{list(loss.shape) if isinstance(loss, torch.Tensor) else ''}, not a scalar tensor")
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise TrajscopeError(f"{self.run.path}: replaying the loss on step {ck.step}'s batch failed ({type(e).__name__}: "
                                 f"{msg[:300]}): check the model and loss (--model, --loss)") from None

    def rules(self, ck: Checkpoint) -> list[UpdateRule]:
        out = []
        for g, names in enumerate(self.run.param_groups):
            state = next((ck.optimizer_state.get(n) for n in names if ck.optimizer_state.get(n)), None)
            out.append(update_rule(self.run.optimizer_class, ck.hparams[g], state))
        return out

    def node_map(self, layer: NodeLayer, rules: list[UpdateRule]) -> NodeMap:
        """The update map of the layer's nodes (its bias may sit in another parameter group)."""
        rw = rules[self.group_of.get(layer.weight, 0)]
        rb = rules[self.group_of[layer.bias]] if layer.bias in self.group_of else None
        return node_map(rw, rb, layer.node_dim)

    def checkpoint(self, step: int, succ: int | None, first_norms: dict[str, torch.Tensor] | None) -> tuple[dict, dict]:
        """(global values, per-layer node arrays) of one checkpoint."""
        run, opts = self.run, self.opts
        ck = run.checkpoint(step)
        dev, dt = opts.device, self.dtype
        params = {k: _to(v, dev, dt) for k, v in ck.params.items()}
        buffers = {k: _to(v, dev, dt) for k, v in ck.buffers.items()}
        # θ_{t+k} only feeds the kinematics, which run on the CPU
        nxt = {k: _to(v, "cpu", dt) for k, v in run.params(succ).items()} if succ is not None else None
        rules = self.rules(ck)
        threshold = min((_threshold(r) for r in rules), default=math.nan)
        finite = _finite(params.values())
        glob: dict[str, float] = {"loss": ck.loss, "sharpness": math.nan, "threshold": threshold,
                                  "step_gap": float(succ - step) if succ is not None else math.nan}
        cr = None
        if not self.kinematics_only and finite:
            batch = run.probe if opts.batch == "probe" else ck.batch
            inputs, targets = _to(batch[0], dev, dt), _to(batch[1], dev, dt)
            rp = self.replay(ck, inputs)
            self.coupled |= rp.batch_statistics(self.model)
            try:
                cr = node_curvature(Problem(self.model, params, buffers, inputs, targets, self.loss_fn, rp),
                                    self.layers, kind=opts.curvature)
                glob["loss"] = float(cr.loss)
                if opts.batch == "step" and math.isfinite(ck.loss):
                    # fidelity: the replayed function against the one trained, at this step
                    glob["recorded_loss"] = ck.loss
                    glob["loss_mismatch"] = abs(glob["loss"] - ck.loss) / max(abs(ck.loss), 1e-30)
                if opts.batch == "step":
                    glob.update(self._gradient_check(ck, cr, not glob.get("loss_mismatch", 0.0) > FIDELITY_TOL))
            except ValueError as e:  # e.g. exact conv blocks too large for memory: say what to do
                raise TrajscopeError(f"step {step}: {str(e).splitlines()[0]}") from None
            except (RuntimeError, torch.linalg.LinAlgError) as e:  # e.g. non-finite activations from huge weights
                self._failed(f"step {step}: curvature failed ({type(e).__name__}: {_first_line(e)}); nodes get NaN")
                cr = None
        # a clipped step's map is the rule's on c_t·H (c_t frozen; updatemap, "What else changes the step")
        clip = glob.pop("map_factor", 1.0)
        if clip != 1.0:
            glob["threshold"] = min((_threshold(r, clip) for r in rules), default=math.nan)
        # Adam's frozen preconditioner D, once per checkpoint: the node spectra and the
        # preconditioned sharpness both use it.
        precond = None
        if cr is not None and any(r.preconditioned for r in rules):
            precond = {name: _precond(rules[self.group_of.get(name, 0)], ck.optimizer_state.get(name, {}),
                                      clip * cr.grads[name], p) for name, p in params.items()}
        if not self.kinematics_only and finite and opts.sharpness:
            try:
                glob.update(self._sharpness(params, buffers, inputs, targets, precond, rules, rp, clip))
            except (RuntimeError, torch.linalg.LinAlgError) as e:   # as for the curvature: NaN, not an abort
                self._failed(f"step {step}: sharpness failed ({type(e).__name__}: {_first_line(e)}); "
                             f"global/sharpness is NaN")
        moves = {l.name: self._motion(l, params, nxt, cr, rules, precond) for l in self.layers} if cr is not None else {}
        fair = _equal_share([m[1] for m in moves.values()])
        nodes = {}
        for layer in self.layers:
            move = (moves[layer.name][0], moves[layer.name][1] / fair) if layer.name in moves else None
            nodes[layer.name] = self._layer(layer, params, nxt, succ, step, cr, rules, precond, glob["loss"], first_norms,
                                            move, clip)
        return glob, nodes

    def _motion(self, layer: NodeLayer, params, nxt, cr: CurvatureResult, rules, precond) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u (N, p), s (N,))``: the node's motion (labels.py) and the first-order loss decrease
        it accounts for, s_i = −g_i·u_i (float64, CPU)."""
        nm = self.node_map(layer, rules)
        theta = node_matrix(params, layer).cpu().to(torch.float64)
        g = node_matrix(cr.grads, layer).cpu().to(torch.float64)
        d = map_scale(nm, node_matrix(precond, layer).cpu() if nm.rule.preconditioned else None, g)
        step = -nm.sign * d * g
        u = node_matrix(nxt, layer).to(torch.float64) - theta if nxt is not None else step
        u = torch.where((u != 0).any(dim=1, keepdim=True), u, step)
        return u, -(g * u).sum(dim=1)

    def _gradient_check(self, ck: Checkpoint, cr: Any, loss_faithful: bool = True) -> dict[str, float]:
        """The recorded gradient norms of the step against the replayed ‖∇L(θ_t)‖ over the parameters the
        optimizer steps (:func:`~trajscope.dynamics.updatemap.step_gradient`): the global series of
        :data:`STEP_SERIES` and ``map_factor`` (c_t where clipped, else 1)."""
        names = [n for n in self.group_of if n in cr.grads]
        replayed = math.sqrt(sum(float(cr.grads[n].detach().double().pow(2).sum()) for n in names))
        sg = step_gradient(replayed, ck.grad_norms.get("stepped", math.nan), ck.grad_norms.get("backward", math.nan),
                           loss_faithful=loss_faithful)
        out = {"grad_norm": sg.replayed, "recorded_grad_norm": sg.stepped, "backward_grad_norm": sg.backward,
               "step_factor": sg.factor, "loss_scale": sg.loss_scale, "clipped": float(sg.clipped),
               "grad_norm_mismatch": sg.mismatch}
        if math.isnan(sg.factor):   # nothing recorded to compare with (a run recorded before the norms were)
            return {}
        return {**out, "map_factor": sg.map_factor}

    def _sharpness(self, params, buffers, inputs, targets, precond, rules, rp, clip: float = 1.0) -> dict[str, float]:
        out: dict[str, float] = {}
        problem = Problem(self.model, params, buffers, inputs, targets, self.loss_fn, rp)
        res = compute_sharpness(problem)
        out["sharpness"], out["n_hvp"] = res.value, float(res.n_hvp)
        if precond is not None:
            # the curvature Adam's map sees: P^{1/2}(c·H + coupled wd)P^{1/2} (c the clip factor), comparable
            # with the threshold; = c·λmax(P^{1/2}(H + wd/c)P^{1/2})
            shift = {name: rules[self.group_of.get(name, 0)].coupled_shift / clip for name in params}
            out["precond_sharpness"] = clip * compute_sharpness(problem, precond=precond, shift=shift).value
        return out

    def _layer(self, layer: NodeLayer, params, nxt, succ, step, cr, rules, precond, loss, first_norms,
               move: tuple[torch.Tensor, torch.Tensor] | None, clip: float = 1.0) -> dict[str, np.ndarray]:
        n, p = layer.n_nodes, layer.node_dim
        # per-node work from here on is small: on the CPU, whatever the analysis device
        theta = node_matrix(params, layer).cpu()
        theta_next = node_matrix(nxt, layer).cpu() if nxt is not None else None
        k = (succ - step) if succ is not None else 1
        kin = node_kinematics(theta, theta_next, k)
        nan = np.full(n, np.nan, np.float32)
        out: dict[str, np.ndarray] = {"param_norm": _np32(kin["param_norm"]), "rho": _np32(kin["rho"]),
                                      "drift": _np32(kin["drift"])}
        if self.kinematics_only:
            out.update(motion_radius=nan, loss_share=nan, hess_max=nan, hess_min=nan, spectral_radius=nan, grad_norm=nan,
                       null_dims=np.zeros(n, np.int32), neutral_dims=np.zeros(n, np.int32),
                       label=np.full(n, NOT_COMPUTED, np.uint8), reason=np.full(n, NOT_COMPUTED, np.uint8))
            return out
        nm = self.node_map(layer, rules)
        if cr is not None:
            eig = cr.eigvals[layer.name]
            hmax, hmin = node_hessian_extremes(eig, p)
            grad_norm = node_matrix(cr.grads, layer).norm(dim=1).cpu()
            rule = nm.rule
            if nm.transformed:
                # clipped (c = clip < 1): the map's curvature is c·H, and eig of (DA)^{1/2}(s·c·H + shift)(DA)^{1/2}
                # are c × those of (DA)^{1/2}(s·H + shift/c)(DA)^{1/2}
                factor = cr.factors[layer.name]
                fast = None
                if nm.lr_scale is not None and not rule.preconditioned:  # a bias in another SGD group
                    w = torch.as_tensor(nm.shift, dtype=torch.float64).reshape(-1)
                    fast = bias_group_eigvals(factor, nm.sign, float(w[0]) / clip, float(w[-1]) / clip,
                                              float(nm.lr_scale[-1]))
                if fast is not None:  # the eigenvalues less wd: the rule adds wd to all p of them
                    eig, rule = clip * fast, replace(rule, weight_decay=float(w[0]))
                else:
                    dm = map_scale(nm, node_matrix(precond, layer) if rule.preconditioned else None,
                                   torch.empty(n, p, dtype=torch.float64))
                    # eig of (DA)^{1/2}(s·H + shift)(DA)^{1/2}; s = -1 when maximising
                    shift = nm.shift / clip
                    eig = clip * (preconditioned_eigvals(factor, dm, shift=shift) if nm.sign > 0 else
                                  -preconditioned_eigvals(factor, dm, shift=-shift).flip(1))
            elif clip != 1.0:
                eig = clip * eig   # λ' = s·c·λ + wd: decay is added after clipping
            spectra = node_update_spectra(eig, p, rule)
            pre = node_matrix(precond, layer).cpu() if nm.rule.preconditioned else None
            motion = (*motion_from_eigs(motion_curvature(cr.factors[layer.name], nm, move[0], pre, clip), nm.rule),
                      move[1])
            if self.opts.motion_fractions:
                neutral_f, unstable_f = motion_fractions(cr.factors[layer.name], nm, nm.rule, move[0], pre, self.delta,
                                                         clip)
                out.update(neutral_fraction=_np32(neutral_f), unstable_fraction=_np32(unstable_f))
        else:
            fill = torch.full((n,), float("nan"), dtype=torch.float64)
            hmax, hmin, grad_norm = fill, fill, fill
            spectra = node_update_spectra(torch.full((n, 1), float("nan"), dtype=torch.float64), p, nm.rule)
            motion = None
        norms = kin["param_norm"].to(torch.float64)
        ref = collapse_reference_norm(self.opts.labels, norms, first_norms.get(layer.name) if first_norms else None)
        label, reason, neutral = classify(spectra, norms, ref, grad_norm.to(torch.float64), hmin.to(torch.float64),
                                          float(loss), self.opts.labels, self.delta, motion=motion,
                                          hess_max=hmax.to(torch.float64))
        out.update(motion_radius=_np32(motion[0]) if motion is not None else nan,
                   loss_share=_np32(motion[2]) if motion is not None else nan,
                   hess_max=_np32(hmax), hess_min=_np32(hmin), spectral_radius=_np32(spectra.radius),
                   grad_norm=_np32(grad_norm), null_dims=spectra.null_dims.cpu().numpy().astype(np.int32),
                   neutral_dims=neutral.cpu().numpy().astype(np.int32), label=label.cpu().numpy().astype(np.uint8),
                   reason=reason.cpu().numpy().astype(np.uint8))
        return out


def _equal_share(shares: Sequence[torch.Tensor]) -> float:
    """An equal share of the step's first-order loss decrease: Σ_j |s_j| / N over every node of
    every layer (inf when there is none, so that shares divided by it are 0)."""
    n = sum(int(s.numel()) for s in shares)
    tot = sum(float(torch.nansum(s.abs())) for s in shares)
    return tot / n if n and tot > 0 else math.inf


def _horizon(run: Run, opts: AnalysisOptions) -> int:
    """K: the training steps between analysed checkpoints (the median gap; the recording
    interval when one checkpoint is analysed), over which one checkpoint's map stands for the
    dynamics (labels.resolve_delta)."""
    steps = [s for s, _ in eligible_steps(run, opts, [])]
    if len(steps) > 1:
        return max(1, int(np.median(np.diff(steps))))
    return max(1, int(run.every or 1))


def _loss_override(run: Run, spec: str | None, loss_fn: Callable) -> str | None:
    """A note when ``--loss`` names another loss than the recorded one: the replay then differs from training."""
    recorded = loss_spec(run.attrs.get("loss"))
    if spec is None or recorded is None:
        return None
    obj = loss_fn if not isinstance(loss_fn, torch.nn.Module) else type(loss_fn)
    got = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', '?')}"
    if got == recorded:
        return None
    return (f"--loss {spec} replaces the recorded loss {recorded}: the analysis replays another function than the "
            f"one trained (curvature, spectra and labels are of that function)")


def _threshold(rule: UpdateRule, clip: float = 1.0) -> float:
    """The stability threshold as a bound on the loss curvature λ (SGD's coupled decay shifts λ' = c·λ + wd,
    c the clip factor of a clipped step); adaptive kinds: on λ̃ (precond_sharpness carries c)."""
    th = stability_threshold(rule)
    return th if rule.preconditioned else (th - rule.coupled_shift) / clip


def _precond(rule: UpdateRule, state: Mapping[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The optimizer's frozen diagonal preconditioner D for one parameter (updatemap.preconditioner)."""
    moved = {k: _opt(v, param) for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == param.shape}
    return preconditioner(rule, moved, grad, param=param).to(param.dtype)


def _opt(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(device=like.device, dtype=like.dtype)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


# --------------------------------------------------------------------------- one run
def analyze_run(path: str | Path, opts: AnalysisOptions, console: Console | None = None) -> RunSummary:
    """Analyse the new checkpoints of one run; returns what was done."""
    console = console or Console(stderr=True)
    run = open_run(path)
    if not len(run.steps):
        raise TrajscopeError(f"{run.path} has no committed checkpoint yet: nothing to analyse")
    an = _Analyser(run, opts)
    # One analysis of a run at a time: the second waits, then analyses what is still new.
    with analysis_lock(run.path, on_wait=lambda msg: print(f"trajscope: {msg}", file=sys.stderr, flush=True)):
        return _analyze_locked(run, an, opts, console)


def _analyze_locked(run: Run, an: _Analyser, opts: AnalysisOptions, console: Console) -> RunSummary:
    layers = {l.name: l.n_nodes for l in an.layers}
    discard_partial_stores(run.path)
    # Only a missing store means "nothing analysed yet": a damaged one is an error, never a fresh start
    # (appending to it from scratch would duplicate its rows).
    prev = open_results(run.path) if results_exist(run.path) else None
    done = [int(s) for s in prev.steps] if prev is not None else []
    attrs = prev.attrs if prev is not None else {}
    # the label rule and δ are fixed at the first analysis of a run so that appended labels stay comparable
    # (stores written before the label_config attribute named its preset used the acted rule)
    was = (attrs.get("label_config") or {}).get("preset", "acted") if prev is not None and done else None
    if was is not None and was != opts.labels.preset:
        raise TrajscopeError(f"{run.path} was analysed with label preset {was!r}; appended labels must use the same: "
                             f"pass --preset {was}, or move {run.path / 'analysis.zarr'} aside to re-analyse from scratch")
    if "delta" in attrs:
        if opts.labels.delta is not None and not math.isclose(opts.labels.delta, attrs["delta"]):
            raise TrajscopeError(f"{run.path} was analysed with delta {attrs['delta']:g}; appended labels must use the "
                                 f"same: drop --delta, or move {run.path / 'analysis.zarr'} aside to re-analyse from scratch")
        an.delta = float(attrs["delta"])
    todo = eligible_steps(run, opts, done)
    summary = RunSummary(run=run.path, analysed=[], results=None, kinematics_only=an.kinematics_only)
    if an.loss_override:
        summary.notes.append(an.loss_override)
    if an.kinematics_only:
        summary.notes.append("the run has no recorded batches: kinematics only (no curvature, spectra or labels)")
    if not todo:
        summary.notes.append("nothing new to analyse" if done else "no checkpoint matches the selection")
        summary.results = prev
        return summary
    # first norms (collapse reference) and label history for stable labels, from earlier analyses
    first_norms: dict[str, torch.Tensor] = {}
    history: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    prev_stable: dict[str, np.ndarray | None] = {l: None for l in layers}
    window = max(1, opts.labels.stable_window)
    if prev is not None and len(done):
        damaged = prev.global_series("damaged") if "damaged" in prev.global_names else np.zeros(len(done))
        first = int(np.argmax(damaged != 1)) if (damaged != 1).any() else None
        for l in layers:
            if first is not None:  # the collapse reference: the first row that is not damaged
                first_norms[l] = torch.from_numpy(np.asarray(prev.node(l, "param_norm", first), np.float64))
            lab = prev.node(l, "label")
            history[l] = [row for row in lab[-(window - 1):]] if window > 1 else []
            prev_stable[l] = prev.node(l, "stable_label", len(done) - 1)
    ck0 = _first_readable_checkpoint(run, todo)
    if not an.kinematics_only:
        an.preflight(ck0)
    rules0 = an.rules(ck0)
    maps0 = {l.name: an.node_map(l, rules0).note for l in an.layers}
    summary.notes += [f"{name}: {note}" for name, note in maps0.items() if note]
    if any(r.kind == "gd_fallback" for r in rules0):
        summary.notes.append(f"WARNING: trajscope has no update map for {rules0[0].optimizer.rsplit('.', 1)[-1]}: the "
                             f"spectra, thresholds and labels use plain gradient descent with the group's lr")
    result_attrs = {
        "trajscope_version": trajscope.__version__,
        "labels": list(LABELS), "reasons": list(REASONS), "not_computed_code": NOT_COMPUTED,
        "curvature": opts.curvature, "batch": opts.batch, "dtype": opts.dtype, "train_mode": opts.train_mode,
        "delta": an.delta, "total_steps_at_first_analysis": an.total_steps, "label_horizon": an.horizon,
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
        "layer_info": {l.name: {"kind": l.kind, "n_nodes": l.n_nodes, "node_dim": l.node_dim,
                                **({"map_note": maps0[l.name]} if maps0[l.name] else {})} for l in an.layers},
    }
    writer = ResultsWriter(run.path, result_attrs, layers, expected=len(todo))
    events = EventWriter(run.path, list(layers))
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=not opts.progress, transient=False)
    try:
        with progress:
            task = progress.add_task(f"{run.path.name}", total=len(todo))
            for step, succ in todo:
                try:
                    glob, nodes = an.checkpoint(step, succ, first_norms)
                except Exception as e:
                    # Local failure (SPEC 10): this row is NaN and says so; the other steps go on.
                    if isinstance(e, TrajscopeError) and not isinstance(e, DamagedRecordError):
                        raise          # bad input that holds for every step: one line, not a row per step
                    marker = "damaged" if isinstance(e, DamagedRecordError) else "failed"
                    why = str(e) if marker == "damaged" else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    warnings.warn(f"step {step}: {why}; its row is NaN (global/{marker} = 1)")
                    summary.notes.append(f"step {step} not analysed: {why}")
                    writer.append(step, *_nan_row(an.layers, marker))
                    summary.analysed.append(step)
                    progress.advance(task)
                    continue
                if not first_norms:  # the first analysed row is the collapse reference of the run
                    first_norms = {l: torch.from_numpy(nodes[l]["param_norm"].astype(np.float64)) for l in layers}
                for l in layers:
                    lab = nodes[l]["label"]
                    if an.kinematics_only:
                        stable = lab
                    else:
                        hist = torch.from_numpy(np.stack(history[l])) if history[l] else None
                        ps = torch.from_numpy(prev_stable[l]) if prev_stable[l] is not None else None
                        stable = stable_labels(hist, ps, torch.from_numpy(lab), window).numpy().astype(np.uint8)
                    nodes[l]["stable_label"] = stable
                    history[l] = (history[l] + [lab])[-(window - 1):] if window > 1 else []
                    prev_stable[l] = stable
                if "loss_mismatch" in glob:
                    summary.mismatches[step] = glob["loss_mismatch"]
                if "step_factor" in glob:
                    summary.step_rows[step] = {k: glob[k] for k in STEP_SERIES}
                writer.append(step, glob, nodes)
                events.write(step, glob, nodes)
                summary.analysed.append(step)
                progress.advance(task)
        earlier = ({int(st): float(m) for st, m in zip(prev.steps, prev.global_series("loss_mismatch")) if np.isfinite(m)}
                   if prev is not None and "loss_mismatch" in prev.global_names else {})
        replayed = _train_mode_summary(an, opts)
        summary.notes += replayed["notes"]
        fidelity = _fidelity({**earlier, **summary.mismatches})
        if fidelity["note"]:
            summary.notes.append(fidelity["note"])
        summary.notes += an.failures
        rows = {**_earlier_step_rows(prev), **summary.step_rows}
        fidelity["grad_norm"], changes = _grad_fidelity(rows), _step_changes(rows)
        summary.notes += [n for n in (*changes["notes"], fidelity["grad_norm"]["note"]) if n]
        writer.update_attrs(fidelity=fidelity, step_changes=changes,
                            train_mode_replay={k: v for k, v in replayed.items() if k != "notes"})
        # the WARNING lines of every analysis of the run, for the dashboard (earlier ones first, once each)
        said = list(prev.attrs.get("warnings", [])) if prev is not None else []
        writer.update_attrs(warnings=said + [n for n in summary.notes if n.startswith("WARNING") and n not in said])
    finally:
        writer.close()
        events.close()
    summary.results = open_results(run.path)
    return summary


def _train_mode_summary(an: _Analyser, opts: AnalysisOptions) -> dict[str, Any]:
    """How train-mode layers were replayed (results attribute ``train_mode_replay``), with the summary's lines:
    one note saying how, and one WARNING per way the replay departed from training (with its steps)."""
    sensitive = replay_mod.mode_sensitive(an.model, an.recorded_sensitive) if an.model is not None else []
    out: dict[str, Any] = {"mode": opts.train_mode, "modules": sensitive, "coupled_curvature": an.coupled,
                           "replayed_checkpoints": an.n_replayed,
                           "departures": [{"why": why, "steps": steps} for why, steps in an.replay_issues.items()],
                           "notes": []}
    if not sensitive:
        return out
    if opts.train_mode == "off":
        out["notes"].append(f"--train-mode off: BatchNorm and dropout ({len(sensitive)} module(s)) replayed in eval "
                            f"mode (running statistics, no dropout), not as trained")
    elif an.n_replayed:
        out["notes"].append("train-mode layers replayed as trained (BatchNorm on each micro-batch's statistics, "
                            "dropout with the recorded RNG state)" +
                            ("; BatchNorm couples the samples: node blocks include cross-sample terms" if an.coupled else ""))
    warn = "" if opts.batch == "probe" else "WARNING: "   # the probe in eval mode is the design, not a departure
    for why, steps in an.replay_issues.items():
        shown = ", ".join(map(str, steps[:5])) + (", ..." if len(steps) > 5 else "")
        out["notes"].append(f"{warn}{why} (steps {shown})")
    return out


#: relative gap between the replayed and the recorded loss above which the replay is said to differ
#: from training (float32 replay of a float32 run agrees to ~1e-6)
FIDELITY_TOL = 1e-4


def _fidelity(mismatches: Mapping[int, float]) -> dict[str, Any]:
    """The fidelity check of the analysed checkpoints: how far the replayed loss is from the recorded one."""
    over = sorted(s for s, m in mismatches.items() if not m <= FIDELITY_TOL)
    worst = max(mismatches.values(), default=math.nan)
    note = None
    if over:
        shown = ", ".join(map(str, over[:5])) + (", ..." if len(over) > 5 else "")
        note = (f"WARNING: the replayed loss differs from the recorded loss by up to {100 * worst:.3g}% at "
                f"{len(over)} of {len(mismatches)} checkpoints (steps {shown}): the analysis describes another "
                f"function than the one trained (train-mode BatchNorm or dropout, a loss computed differently in "
                f"the loop, micro-batches not all given to rec.batch, or another --model/--loss)")
    return {"tolerance": FIDELITY_TOL, "checked": len(mismatches),
            "max_loss_mismatch": worst if math.isfinite(worst) else None,
            "steps_over_tolerance": over, "note": note}


#: per-step global series of the gradient check (``_Analyser._gradient_check``)
STEP_SERIES = ("grad_norm", "recorded_grad_norm", "backward_grad_norm", "step_factor", "loss_scale", "clipped",
               "grad_norm_mismatch")


def _earlier_step_rows(prev: Any) -> dict[int, dict[str, float]]:
    """The gradient-check values of the steps analysed before (appended analyses accumulate)."""
    if prev is None or "step_factor" not in prev.global_names:
        return {}
    cols = {k: prev.global_series(k) for k in STEP_SERIES if k in prev.global_names}
    return {int(st): {k: float(v[i]) for k, v in cols.items()} for i, st in enumerate(prev.steps)
            if np.isfinite(cols["step_factor"][i])}


def _steps_text(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps[:5])) + (", ..." if len(steps) > 5 else "")


def _grad_fidelity(rows: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    """The gradient half of the fidelity check: steps whose recorded gradient norm no clipping or loss
    scaling explains (``grad_norm_mismatch`` over :data:`GRAD_NORM_TOL`)."""
    gaps = {s: r["grad_norm_mismatch"] for s, r in rows.items() if math.isfinite(r["grad_norm_mismatch"])}
    over = sorted(s for s, m in gaps.items() if m > GRAD_NORM_TOL)
    worst = max(gaps.values(), default=math.nan)
    note = None
    if over:
        note = (f"WARNING: the gradient the optimizer stepped with differs from the replayed gradient by up to "
                f"{100 * worst:.3g}% at {len(over)} of {len(gaps)} checkpoints (steps {_steps_text(over)}), and no "
                f"clipping (factor < 1) or loss scaling (a power of two) explains it: the gradient was changed in "
                f"the loop before optimizer.step, or the replay computes another loss")
    return {"tolerance": GRAD_NORM_TOL, "checked": len(gaps), "max_mismatch": worst if math.isfinite(worst) else None,
            "steps_over_tolerance": over, "note": note}


def _step_changes(rows: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    """What changed the analysed steps, named: gradient clipping (how many steps, the smallest factor)
    and loss scaling (the scales seen)."""
    clipped = sorted(s for s, r in rows.items() if r["clipped"] == 1)
    factors = [rows[s]["step_factor"] for s in clipped]
    scaled = sorted(s for s, r in rows.items() if math.isfinite(r["loss_scale"]) and r["loss_scale"] != 1
                    and r["grad_norm_mismatch"] == 0)   # a mismatch's nearest power of two is no loss scale
    scales = sorted({rows[s]["loss_scale"] for s in scaled})
    notes = []
    if clipped:
        notes.append(f"gradient clipping: {len(clipped)} of {len(rows)} analysed steps were clipped (min factor "
                     f"{min(factors):.4g}); their update maps and thresholds use the clipped gradient, the clip "
                     f"factor frozen")
    if scaled:
        notes.append(f"loss scaling: backward's gradient was scaled by {', '.join(f'{v:g}' for v in scales)} "
                     f"(GradScaler) at {len(scaled)} of {len(rows)} analysed steps and unscaled before the step: "
                     f"not a mismatch")
    return {"checked": len(rows), "clipped_steps": clipped, "min_clip_factor": min(factors) if factors else None,
            "loss_scaled_steps": scaled, "loss_scales": scales, "notes": notes}


def _first_readable_checkpoint(run: Run, todo: Sequence[tuple[int, int | None]]) -> Checkpoint:
    """The first checkpoint to analyse that reads (its hyperparameters describe the run's maps)."""
    for i, (step, _) in enumerate(todo):
        try:
            return run.checkpoint(step)
        except DamagedRecordError:
            if i == len(todo) - 1:
                raise


def _nan_row(layers: Sequence[NodeLayer], marker: str) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """The (global, nodes) row of a checkpoint that could not be analysed: NaN, not computed, and
    ``global/<marker>`` = 1 ("damaged": its record; "failed": the analysis of it)."""
    glob = {"loss": math.nan, "sharpness": math.nan, "threshold": math.nan, "step_gap": math.nan, marker: 1.0}
    nodes = {}
    for layer in layers:
        n = layer.n_nodes
        row = {m: np.full(n, np.nan, np.float32) for m in NODE_FLOAT}
        row.update({m: np.full(n, UNSET_INT, np.int32) for m in NODE_INT})
        row.update({m: np.full(n, NOT_COMPUTED, np.uint8) for m in NODE_U8})
        nodes[layer.name] = row
    return glob, nodes


# --------------------------------------------------------------------------- many runs, API and CLI
def analyze(paths: str | Path | Sequence[str | Path], *, console: Console | None = None, **options: Any) -> dict[Path, Any]:
    """Analyse run folders (or folders of runs). Returns ``{run folder: trajscope.io.results.Results}``.

    Keyword options are the fields of :class:`AnalysisOptions`; label options may be given either as
    ``labels=LabelConfig(...)`` or flat (``preset=``, ``delta=``, ``collapse_ratio=``, ...).
    """
    opts = _options(**options)
    return {s.run: s.results for s in _analyze_many(paths, opts, console)}


def _options(**options: Any) -> AnalysisOptions:
    label_keys = set(LabelConfig.__dataclass_fields__)
    label_kw = {k: options.pop(k) for k in list(options) if k in label_keys}
    if label_kw:
        options["labels"] = LabelConfig(**label_kw)
    options.setdefault("progress", False)
    return AnalysisOptions(**options)


def _analyze_many(paths: str | Path | Sequence[str | Path], opts: AnalysisOptions, console: Console | None) -> list[RunSummary]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if any(not str(p).strip() for p in paths):
        raise TrajscopeError("an empty path was given: name a run folder or a folder of runs")
    for p in map(Path, paths):
        if not p.exists():
            raise TrajscopeError(f"{p} does not exist: give a run folder or a folder of runs")
    runs = find_runs(paths)
    if not runs:
        raise TrajscopeError(f"no trajscope run under {', '.join(map(str, paths))}: a run folder holds trajectory.zarr (written by trajscope.Recorder)")
    if opts.steps is not None:
        _check_selection(runs, opts)
    return [analyze_run(r, opts, console) for r in runs]


def _check_selection(runs: Sequence[Path], opts: AnalysisOptions) -> None:
    """One line, before anything is written, when ``--steps`` selects no checkpoint of any run."""
    spans = []
    for path in runs:
        run = open_run(path)
        if eligible_steps(run, opts, []):
            return
        if len(run.steps):
            spans.append(f"{run.path.name}: {int(run.steps[0])}..{int(run.steps[-1])}")
    raise TrajscopeError(f"--steps {range_text(opts.steps)} selects no recorded checkpoint (recorded steps "
                         f"{'; '.join(spans) or 'none'})")


def _summary_table(s: RunSummary) -> Table:
    res = s.results
    t = Table(title=f"{escape(str(s.run))}  ({len(s.analysed)} new checkpoint{'s' if len(s.analysed) != 1 else ''}, "
                    f"{len(res.steps) if res is not None else 0} in all)", title_justify="left")
    t.add_column("layer")
    for name in LABELS:
        t.add_column(name.replace("_", " "), justify="right")
    t.add_column("max radius", justify="right")
    if res is None or not len(res.steps):
        return t
    for layer in res.layers:
        lab = res.node(layer, "label", len(res.steps) - 1)
        rad = res.node(layer, "spectral_radius", len(res.steps) - 1)
        counts = [str(int((lab == c).sum())) for c in range(len(LABELS))]
        t.add_row(layer, *counts, f"{np.nanmax(rad):.4g}" if np.isfinite(rad).any() else "-")
    return t


def analyze_cli(args: Any) -> int:
    """Entry point for ``trajscope analyze`` (argparse namespace from :mod:`trajscope.cli.main`)."""
    steps = parse_steps(args.steps) if args.steps is not None else None
    labels = LabelConfig(preset=args.preset, delta=args.delta, collapse_ratio=args.collapse_ratio,
                         collapse_reference=args.collapse_reference, stable_window=args.stable_window,
                         share_min=args.share_min)
    opts = AnalysisOptions(modules=args.modules, steps=steps, stride=args.stride, all_steps=args.all_steps,
                           batch=args.batch, curvature=args.curvature, sharpness=not args.no_sharpness,
                           motion_fractions=args.fractions, train_mode=args.train_mode, labels=labels,
                           device=args.device, dtype=args.dtype, model=args.model, model_args=args.model_args,
                           loss=args.loss, loss_args=args.loss_args, trust=args.trust, progress=not args.no_progress)
    console = Console()
    t0 = time.perf_counter()
    summaries = _analyze_many(args.paths, opts, Console(stderr=True))
    for s in summaries:
        console.print(_summary_table(s))
        res = s.results
        if res is not None and len(res.steps):
            sh, th = res.global_series("sharpness")[-1], res.global_series("threshold")[-1]
            line = f"  last step {int(res.steps[-1])}: loss {res.global_series('loss')[-1]:.4g}, sharpness {sh:.4g} vs threshold {th:.4g}"
            if "precond_sharpness" in res.global_names:
                line += f" (preconditioned sharpness {res.global_series('precond_sharpness')[-1]:.4g})"
            print(line)
        for note in s.notes:
            print(f"  note: {note}")
    # Plain print, not rich: the command must survive pipes (no wrapping) and odd folder names (no markup).
    logdir = os.path.commonpath([str(s.run.parent.resolve()) for s in summaries])
    print(f"analysed {sum(len(s.analysed) for s in summaries)} checkpoints of {len(summaries)} run(s) in "
          f"{time.perf_counter() - t0:.1f} s; results: RUN/analysis.zarr and RUN/events.out.tfevents.* in each run folder")
    print(f"view them with:  tensorboard --logdir {shlex.quote(logdir)}")
    return 0
