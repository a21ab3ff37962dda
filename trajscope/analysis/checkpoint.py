"""The analysis of one checkpoint: replay, curvature, per-layer spectra, kinematics, labels, sharpness."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from trajscope.analysis.fidelity import FIDELITY_TOL
from trajscope.analysis.layer import NOT_COMPUTED, LayerInputs, analyse_layer, equal_share, node_motion
from trajscope.analysis.options import AnalysisOptions
from trajscope.analysis.selection import horizon, recorded_node_layers
from trajscope.curvature.node import CurvatureResult, node_curvature
from trajscope.curvature.sharpness import sharpness as compute_sharpness
from trajscope.dynamics.labels import resolve_delta
from trajscope.dynamics.optimizers import NodeMap, UpdateRule, node_map, preconditioner, update_rule
from trajscope.dynamics.stepgrad import step_gradient
from trajscope.dynamics.updatemap import stability_threshold
from trajscope.errors import TrajscopeError
from trajscope.nodes import NodeLayer, node_matrix
from trajscope.replay import trainmode as replay_mod
from trajscope.replay.problem import Problem
from trajscope.replay.run import Checkpoint, Run
from trajscope.trust import loss_spec

__all__ = ["Analyser", "NOT_COMPUTED"]


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


class Analyser:
    """Analyses the checkpoints of one run; holds what is shared between them."""

    def __init__(self, run: Run, opts: AnalysisOptions) -> None:
        self.run, self.opts = run, opts
        self.dtype = getattr(torch, opts.dtype)
        self.layers = recorded_node_layers(run, opts.modules)
        if not self.layers:
            raise TrajscopeError(f"{run.path}: the model has no Linear/Conv layer, so there are no nodes to analyse")
        self.kinematics_only = not run.has_batches and not (opts.batch == "probe" and run.probe is not None)
        if opts.batch == "probe" and run.probe is None:
            raise TrajscopeError(
                f"{run.path} has no probe batch: record one with Recorder(probe=...) or use --batch step"
            )
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
        self.replay_issues: dict[str, list[int]] = {}  # why a replay departs from training -> steps
        self.coupled = False  # some checkpoint used the coupled curvature route
        self.n_replayed = 0  # checkpoints replayed per recorded forward pass
        self.group_of = {name: g for g, names in enumerate(run.param_groups) for name in names}
        self.total_steps = int(run.steps[-1]) + 1 if len(run.steps) else 1
        self.horizon = horizon(run, opts)
        self.delta = resolve_delta(opts.labels, self.total_steps, self.horizon)
        self.failures: list[str] = []  # a part of one checkpoint that failed (its values NaN): summary lines

    def replay(self, ck: Checkpoint, inputs: Any) -> replay_mod.Replay:
        """How checkpoint ``ck`` is replayed on ``inputs``; a departure from training is kept for the summary."""
        rp, issue = replay_mod.plan(
            self.model,
            ck.forward,
            inputs,
            self.opts.device,
            mode=self.opts.train_mode,
            exported=self.exported,
            compiled=self.compiled,
            probe=self.opts.batch == "probe",
            recorded_sensitive=self.recorded_sensitive,
        )
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
        rp, _ = replay_mod.plan(
            self.model,
            ck.forward,
            inputs,
            dev,
            mode=self.opts.train_mode,
            exported=self.exported,
            compiled=self.compiled,
            probe=self.opts.batch == "probe",
            recorded_sensitive=self.recorded_sensitive,
        )
        try:
            with torch.no_grad():
                loss = self.loss_fn(rp.forward(self.model, params, buffers, inputs), _to(batch[1], dev, dt))
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise TypeError(
                    f"it returned {type(loss).__name__}"
                    f"{list(loss.shape) if isinstance(loss, torch.Tensor) else ''}, not a scalar tensor"
                )
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise TrajscopeError(
                f"{self.run.path}: replaying the loss on step {ck.step}'s batch failed ({type(e).__name__}: "
                f"{msg[:300]}): check the model and loss (--model, --loss)"
            ) from None

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
        ck = self.run.checkpoint(step)
        params, buffers, nxt = self._tensors(ck, succ)
        rules = self.rules(ck)
        threshold = min((_threshold(r) for r in rules), default=math.nan)
        live = not self.kinematics_only and _finite(params.values())
        glob: dict[str, float] = {
            "loss": ck.loss,
            "sharpness": math.nan,
            "threshold": threshold,
            "step_gap": float(succ - step) if succ is not None else math.nan,
        }
        cr, (inputs, targets, rp) = self._curvature(ck, params, buffers, glob) if live else (None, (None, None, None))
        # a clipped step's map is the rule's on c_t·H (c_t frozen; updatemap, "What else changes the step")
        clip = glob.pop("map_factor", 1.0)
        if clip != 1.0:
            glob["threshold"] = min((_threshold(r, clip) for r in rules), default=math.nan)
        precond = self._preconditioners(ck, cr, rules, params, clip)
        if live and self.opts.sharpness:
            try:
                glob.update(self._sharpness(params, buffers, inputs, targets, precond, rules, rp, clip))
            except (RuntimeError, torch.linalg.LinAlgError) as e:  # as for the curvature: NaN, not an abort
                self._failed(
                    f"step {step}: sharpness failed ({type(e).__name__}: {_first_line(e)}); global/sharpness is NaN"
                )
        k = (succ - step) if succ is not None else 1
        layers = [
            self._layer_inputs(l, params, nxt, k, cr, rules, precond, glob["loss"], first_norms, clip)
            for l in self.layers
        ]
        return glob, self._nodes(layers)

    def _tensors(self, ck: Checkpoint, succ: int | None) -> tuple[dict, dict, dict | None]:
        """θ_t and the buffers on the analysis device and dtype, θ_{t+k} (None without a successor)."""
        dev, dt = self.opts.device, self.dtype
        params = {k: _to(v, dev, dt) for k, v in ck.params.items()}
        buffers = {k: _to(v, dev, dt) for k, v in ck.buffers.items()}
        # θ_{t+k} only feeds the kinematics, which run on the CPU
        nxt = {k: _to(v, "cpu", dt) for k, v in self.run.params(succ).items()} if succ is not None else None
        return params, buffers, nxt

    def _curvature(
        self, ck: Checkpoint, params: dict, buffers: dict, glob: dict[str, float]
    ) -> tuple[CurvatureResult | None, tuple[Any, Any, replay_mod.Replay]]:
        """The node curvature of the checkpoint (None where it failed: nodes get NaN) and the batch it was
        replayed on, ``(inputs, targets, replay)``; the loss, fidelity and gradient check go into ``glob``."""
        opts, step = self.opts, ck.step
        dev, dt = opts.device, self.dtype
        batch = self.run.probe if opts.batch == "probe" else ck.batch
        inputs, targets = _to(batch[0], dev, dt), _to(batch[1], dev, dt)
        rp = self.replay(ck, inputs)
        self.coupled |= rp.batch_statistics(self.model)
        try:
            cr = node_curvature(
                Problem(self.model, params, buffers, inputs, targets, self.loss_fn, rp),
                self.layers,
                kind=opts.curvature,
            )
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
        return cr, (inputs, targets, rp)

    def _preconditioners(
        self, ck: Checkpoint, cr: CurvatureResult | None, rules: list[UpdateRule], params: dict, clip: float
    ) -> dict[str, torch.Tensor] | None:
        """Adam's frozen preconditioner D per parameter, once per checkpoint (None: no rule is preconditioned,
        or no curvature): the node spectra and the preconditioned sharpness both use it."""
        if cr is None or not any(r.preconditioned for r in rules):
            return None
        return {
            name: _precond(
                rules[self.group_of.get(name, 0)], ck.optimizer_state.get(name, {}), clip * cr.grads[name], p
            )
            for name, p in params.items()
        }

    def _layer_inputs(
        self,
        layer: NodeLayer,
        params: dict,
        nxt: dict | None,
        k: int,
        cr: CurvatureResult | None,
        rules: list[UpdateRule],
        precond: dict | None,
        loss: float,
        first_norms: dict[str, torch.Tensor] | None,
        clip: float,
    ) -> LayerInputs:
        """One layer's rows of θ_t, θ_{t+k}, ∇L and D (each :func:`~trajscope.nodes.node_matrix` done once)."""
        nm = None if self.kinematics_only else self.node_map(layer, rules)
        pre = node_matrix(precond, layer) if cr is not None and nm is not None and nm.rule.preconditioned else None
        # per-node work from here on is small: on the CPU, whatever the analysis device
        return LayerInputs(
            layer=layer,
            theta=node_matrix(params, layer).cpu(),
            theta_next=node_matrix(nxt, layer).cpu() if nxt is not None else None,
            k=k,
            nmap=nm,
            cr=cr,
            grads=node_matrix(cr.grads, layer) if cr is not None else None,
            precond=pre,
            precond_cpu=pre.cpu() if pre is not None else None,
            loss=loss,
            first_norm=first_norms.get(layer.name) if first_norms else None,
            clip=clip,
        )

    def _nodes(self, layers: list[LayerInputs]) -> dict[str, dict[str, np.ndarray]]:
        """The node arrays of every layer: the motions first (the loss shares are over an equal share of
        every node of every layer), then each layer's analysis."""
        moves = {inp.layer.name: node_motion(inp) for inp in layers if inp.cr is not None}
        fair = equal_share([m[1] for m in moves.values()])
        nodes = {}
        for inp in layers:
            if inp.layer.name in moves:
                inp.move = (moves[inp.layer.name][0], moves[inp.layer.name][1] / fair)
            nodes[inp.layer.name] = analyse_layer(inp, self.opts.labels, self.delta, self.opts.motion_fractions)
        return nodes

    def _gradient_check(self, ck: Checkpoint, cr: Any, loss_faithful: bool = True) -> dict[str, float]:
        """The recorded gradient norms of the step against the replayed ‖∇L(θ_t)‖ over the parameters the
        optimizer steps (:func:`~trajscope.dynamics.stepgrad.step_gradient`): the global series of
        :data:`STEP_SERIES` and ``map_factor`` (c_t where clipped, else 1)."""
        names = [n for n in self.group_of if n in cr.grads]
        replayed = math.sqrt(sum(float(cr.grads[n].detach().double().pow(2).sum()) for n in names))
        sg = step_gradient(
            replayed,
            ck.grad_norms.get("stepped", math.nan),
            ck.grad_norms.get("backward", math.nan),
            loss_faithful=loss_faithful,
        )
        out = {
            "grad_norm": sg.replayed,
            "recorded_grad_norm": sg.stepped,
            "backward_grad_norm": sg.backward,
            "step_factor": sg.factor,
            "loss_scale": sg.loss_scale,
            "clipped": float(sg.clipped),
            "grad_norm_mismatch": sg.mismatch,
        }
        if math.isnan(sg.factor):  # nothing recorded to compare with (a run recorded before the norms were)
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


def _loss_override(run: Run, spec: str | None, loss_fn: Callable) -> str | None:
    """A note when ``--loss`` names another loss than the recorded one: the replay then differs from training."""
    recorded = loss_spec(run.attrs.get("loss"))
    if spec is None or recorded is None:
        return None
    obj = loss_fn if not isinstance(loss_fn, torch.nn.Module) else type(loss_fn)
    got = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', '?')}"
    if got == recorded:
        return None
    return (
        f"--loss {spec} replaces the recorded loss {recorded}: the analysis replays another function than the "
        f"one trained (curvature, spectra and labels are of that function)"
    )


def _threshold(rule: UpdateRule, clip: float = 1.0) -> float:
    """The stability threshold as a bound on the loss curvature λ (SGD's coupled decay shifts λ' = c·λ + wd,
    c the clip factor of a clipped step); adaptive kinds: on λ̃ (precond_sharpness carries c)."""
    th = stability_threshold(rule)
    return th if rule.preconditioned else (th - rule.coupled_shift) / clip


def _precond(
    rule: UpdateRule, state: Mapping[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor
) -> torch.Tensor:
    """The optimizer's frozen diagonal preconditioner D for one parameter (updatemap.preconditioner)."""
    moved = {k: _opt(v, param) for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == param.shape}
    return preconditioner(rule, moved, grad, param=param).to(param.dtype)


def _opt(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(device=like.device, dtype=like.dtype)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""
