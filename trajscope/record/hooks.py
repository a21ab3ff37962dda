"""Hooks that watch a step of training while it runs: the optimizer's step pre-hook (and a closure
passed to ``optimizer.step``), the forward pre-hook on the model the loop calls (train flags and RNG
state of each forward pass), the loss hooks, and the gradient hooks that keep backward's gradient norms."""

from __future__ import annotations

import math
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trajscope.io.records import ForwardState
from trajscope.record.distributed import _distributed
from trajscope.record.snapshot import _batch_size

if TYPE_CHECKING:
    from trajscope.record.recorder import Recorder


#: training forward passes of one step kept for pairing with its batch() calls (more: a loop that runs
#: the model with gradients for something else; the surplus is not kept)
_MAX_UNPAIRED_FORWARDS = 64

# Recorders by the id of the module whose forward passes they watch (several may watch one model). The
# hook is a module-level function that finds its recorders here, not a bound method: a deep copy of the
# model (the export twin, a user's EMA copy) or torch.save of the whole module would otherwise try to copy
# or pickle the Recorder itself. It is registered once per module, while some recorder watches it.
_FORWARD_WATCHERS: dict[int, list[weakref.ref[Recorder]]] = {}
_FORWARD_HANDLES: dict[int, Any] = {}


def _forward_pre_hook(module: nn.Module, args: Any) -> None:
    for ref in list(_FORWARD_WATCHERS.get(id(module), ())):
        rec = ref()
        if rec is not None and rec.model is not None:
            rec._on_forward(module, args)


class _ForwardHookEntry:
    """Registers a recorder for :func:`_forward_pre_hook`; ``remove()`` (as a hook handle) unregisters it."""

    def __init__(self, module: nn.Module, rec: Recorder) -> None:
        self.key = id(module)
        self.ref = weakref.ref(rec)
        if self.key not in _FORWARD_WATCHERS:
            _FORWARD_HANDLES[self.key] = module.register_forward_pre_hook(_forward_pre_hook)
        _FORWARD_WATCHERS.setdefault(self.key, []).append(self.ref)

    def remove(self) -> None:
        watchers = _FORWARD_WATCHERS.get(self.key, [])
        if self.ref in watchers:
            watchers.remove(self.ref)
        if not watchers and self.key in _FORWARD_WATCHERS:
            del _FORWARD_WATCHERS[self.key]
            _FORWARD_HANDLES.pop(self.key).remove()


def _closure_of(args: Any, kwargs: Any) -> tuple[Any, str] | None:
    """The closure passed to ``optimizer.step`` and where it was passed, if any."""
    if kwargs and callable(kwargs.get("closure")):
        return kwargs["closure"], "kwargs"
    if len(args) > 1 and callable(args[1]):  # args[0] is the optimizer itself
        return args[1], "args"
    return None


def _grad_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of ``tensors`` taken together, a 0-d tensor (float32 at least, on the first one's
    device), computed without a device sync. One tensor (the per-parameter hook) skips the grouping
    by device and dtype, which costs more than the norm itself on small models."""
    dense = [(t.coalesce().values() if t.is_sparse else t).detach() for t in tensors]
    dense = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in dense]
    if len(dense) == 1:
        return torch.linalg.vector_norm(dense[0])
    return torch.nn.utils.get_total_norm(dense, error_if_nonfinite=False)


class StepHooks:
    """The :class:`~trajscope.record.recorder.Recorder`'s hooks into the training step."""

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook on the module the loop calls: the train/eval flags and the RNG state this
        forward pass starts from (its dropout masks are drawn from it), paired in order with the
        step's batch() calls (see :meth:`batch`). A pass without gradients (a metric or validation pass
        in between) made no gradient and is not kept. ~55 us per forward pass of a recorded step for an
        81-module model on a busy 2-core machine (each module's flag, and a 5 KiB copy of the CPU
        generator's state); nothing on steps that are not recorded. A failure here only loses the
        forward state (those steps replay in eval mode, said at analysis), never the recording."""
        if (
            self.failed
            or self._closed
            or self._ignore_batches
            or not self.records(self._step)
            or not torch.is_grad_enabled()
        ):
            return
        try:
            if self._modules is None:
                self._modules = list(self.model.named_modules())[1:]
            training = self.model.training
            differ = tuple(n for n, m in self._modules if m.training != training)
            first = next(self.model.parameters(), None)
            dev = first.device if first is not None and first.device.type == "cuda" else None
            cuda = torch.cuda.get_rng_state(dev) if dev is not None else None
            state = (
                training,
                differ,
                torch.get_rng_state(),
                cuda,
                None if dev is None else (dev.index if dev.index is not None else torch.cuda.current_device()),
            )
            if self._awaiting_forward and self._batch_step == self._step:
                self._micro_forward[self._awaiting_forward.pop(0)] = state
            elif len(self._unpaired_forwards) < _MAX_UNPAIRED_FORWARDS:
                self._unpaired_forwards.append(state)
        except Exception as e:  # never break training, nor stop the recording for this
            if not self._warned_forward:
                self._warned_forward = True
                warnings.warn(
                    f"trajscope: the forward pass's train flags and RNG state cannot be recorded "
                    f"({type(e).__name__}: {e}); those steps will be replayed in eval mode",
                    RuntimeWarning,
                )

    def _forward_states(self, micro: list, leaves: list) -> list[ForwardState]:
        """The forward state of each micro-batch the record holds (all of them when they were joined,
        the last one when they could not be); none unless each of those had a forward pass."""
        parts = list(zip(micro, self._micro_forward))
        if len(micro) > 1 and leaves is micro[-1][1]:  # not joinable: the record holds the last one only
            parts = parts[-1:]
        if not parts or len(self._micro_forward) != len(micro) or any(f is None for _, f in parts):
            return []
        return [
            ForwardState(
                size=_batch_size(m[1]), training=f[0], differ=f[1], rng_cpu=f[2], rng_cuda=f[3], cuda_device=f[4]
            )
            for m, f in parts
        ]

    def _on_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.numel() == 1 and not self._ignore_batches:
            self._hook_losses.append(output.detach())
            del self._hook_losses[:-64]  # a loss module also used for metrics must not grow this

    def _on_model_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled():  # a training forward, not an evaluation
            self._on_loss(module, args, getattr(output, "loss", None))

    def _arm_step_hooks(self) -> None:
        """Hooks that watch a step while it runs (the forward pass's state, backward's gradient norms)
        are installed only while the coming step is recorded: on the others their calls into Python
        (one per forward pass, one per parameter in backward) would cost ~0.1 ms a step for nothing."""
        want = not (self.failed or self._closed) and self.records(self._step)
        if want and not self._step_hooks:
            self._step_hooks = [_ForwardHookEntry(self._root, self), *self._gradient_hooks()]
        elif not want:
            for h in self._step_hooks:
                h.remove()
            self._step_hooks = []

    def _gradient_hooks(self) -> list[Any]:
        """Watch the gradient backward accumulates into every parameter the optimizer steps (see
        :meth:`_on_grad`): its norm before the loop unscales or clips it. Not under torch.distributed
        with several ranks: there backward's gradient is the rank's own, before the all-reduce averages
        it into the one the step uses (its norm is recorded NaN)."""
        if _distributed():
            return []
        return [
            p.register_post_accumulate_grad_hook(self._on_grad)
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.requires_grad and p.is_leaf
        ]

    def _on_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: keep ‖p.grad‖ as backward left it, as a tensor on p's device
        (no device sync inside backward; the writer converts it). The latest call of a step wins, so
        under gradient accumulation it is the norm of the accumulated gradient. Recorded steps only."""
        if self.failed or self._closed or self._ignore_batches or not self.records(self._step) or p.grad is None:
            return
        try:
            self._backward_norms[id(p)] = _grad_norm([p.grad])
        except Exception:  # an odd gradient (e.g. sparse layouts): this step's norm is unknown, training goes on
            self._backward_norms[id(p)] = torch.tensor(math.nan)

    def _step_grad_norms(self) -> tuple[Any, Any]:
        """(‖g‖ the optimizer steps with now, ‖g‖ as backward produced it) over the parameters that have
        a gradient, as 0-d tensors (NaN where unknown: a gradient that backward did not write)."""
        with_grad = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        try:
            stepped = _grad_norm([p.grad for p in with_grad])
        except Exception:
            stepped = math.nan
        if not with_grad or any(id(p) not in self._backward_norms for p in with_grad):
            return stepped, math.nan
        try:
            norms = [self._backward_norms[id(p)] for p in with_grad]
            backward = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
        except Exception:
            backward = math.nan
        return stepped, backward

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        # optimizer.step(closure) (Lightning, LBFGS): the batch and the gradient of this step are made
        # inside the closure, after this hook; the step is taken when the closure first returns.
        found = _closure_of(args, kwargs)
        if found is not None:
            return self._defer_to_closure(*found, args, kwargs)
        self._take_step()
        return None

    def _defer_to_closure(self, closure: Any, where: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
        done = False

        def recorded_closure(*a: Any, **k: Any) -> Any:
            nonlocal done
            if done:  # LBFGS re-evaluates at trial points: not a new step, and its batch is this step's
                self._ignore_batches = True
                try:
                    return closure(*a, **k)
                finally:
                    self._ignore_batches = False
            out = closure(*a, **k)
            done = True  # θ_t is still in place: optimizers update after the closure's first return
            self._take_step()
            return out

        args, kwargs = tuple(args), dict(kwargs)
        if where == "kwargs":
            kwargs["closure"] = recorded_closure
        else:
            args = (args[0], recorded_closure, *args[2:])
        return args, kwargs
