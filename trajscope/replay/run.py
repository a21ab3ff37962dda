"""Reading a recorded run: ``trajscope.open_run(path)`` → :class:`Run` → :class:`Checkpoint`.

A checkpoint of step t holds θ_t (parameters immediately before the update of step t), the
buffers, the mini-batch of that update, the loss, the hyperparameters per parameter group, and
the optimizer state before the update. :meth:`Run.model` and :meth:`Run.loss_fn` rebuild a
callable model and loss for offline replay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trajscope.errors import TrajscopeError
from trajscope.io import specs
from trajscope.io.layout import local_run_path
from trajscope.io.reader import TrajectoryReader
from trajscope.io.records import ForwardState
from trajscope.trust import TrustPolicy, loss_spec


@dataclass
class Checkpoint:
    """Everything recorded for one training step."""

    step: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    batch: Any | None  # (inputs, targets) as given to Recorder.batch, or None
    loss: float
    hparams: list[dict[str, Any]]  # per parameter group
    optimizer_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # param name -> state
    # what each micro-batch's forward pass used (train flags, RNG state); None: not recorded by this run
    forward: list[ForwardState] | None = None
    # global gradient norms of the step (store.GRAD_NORM_COLUMNS: "stepped", "backward"); NaN: not recorded
    grad_norms: dict[str, float] = field(default_factory=dict)

    @property
    def inputs(self) -> Any:
        return None if self.batch is None else self.batch[0]

    @property
    def targets(self) -> Any:
        return None if self.batch is None else self.batch[1]


class Run:
    """A recorded run folder (see :func:`open_run`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = local_run_path(path)
        self.reader = TrajectoryReader(self.path)
        self.attrs = self.reader.attrs
        for key in ("model", "optimizer", "cadence"):
            if not isinstance(self.attrs.get(key), Mapping):
                raise TrajscopeError(f"{self.path}: the run's '{key}' description is malformed; the store is damaged")

    # -- description -------------------------------------------------------------------------------
    @property
    def steps(self) -> np.ndarray:
        """Committed, recorded training steps in record order."""
        return self.reader.steps

    @property
    def skipped_steps(self) -> np.ndarray:
        return self.reader.skipped

    @property
    def restarts(self) -> list[dict[str, Any]]:
        return self.reader.restarts

    @property
    def every(self) -> int:
        return int(self.attrs["cadence"]["every"])

    @property
    def window(self) -> int:
        return int(self.attrs["cadence"]["window"])

    @property
    def optimizer_class(self) -> str:
        return self.attrs["optimizer"]["class"]

    @property
    def param_groups(self) -> list[list[str]]:
        """Parameter names of each optimizer group."""
        return [g["params"] for g in self.attrs["optimizer"]["groups"]]

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {s.name: s.shape for s in self.reader.param_layout}

    @property
    def param_dtypes(self) -> dict[str, str]:
        return {s.name: s.dtype for s in self.reader.param_layout}

    @property
    def has_batches(self) -> bool:
        return "batch" in self.attrs

    @property
    def losses(self) -> np.ndarray:
        return self.reader.losses

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {len(self)} steps)"

    # -- data --------------------------------------------------------------------------------------
    def checkpoint(self, step: int) -> Checkpoint:
        r = self.reader.row_of(step)
        return Checkpoint(
            step=int(step),
            params=self.reader.params(r),
            buffers=self.reader.buffers(r),
            batch=self.reader.batch(r),
            loss=float(self.reader.losses[r]),
            hparams=self.reader.hparams(r),
            optimizer_state=self.reader.state(r),
            forward=self.reader.forward(r),
            grad_norms=self.reader.grad_norms(r),
        )

    def params(self, step: int) -> dict[str, torch.Tensor]:
        return self.reader.params(self.reader.row_of(step))

    def __iter__(self):
        for s in self.steps:
            yield self.checkpoint(int(s))

    @cached_property
    def probe(self) -> Any | None:
        """The fixed probe batch ``(inputs, targets)``, if one was recorded."""
        return self.reader.probe()

    # -- replay ------------------------------------------------------------------------------------
    def model(
        self, spec: str | None = None, kwargs: str | Mapping[str, Any] | None = None, *, trust: bool = False
    ) -> nn.Module:
        """A module with the recorded architecture (eval mode), checked against the recorded parameters.

        ``spec``/``kwargs`` (chosen by the caller) override the recorded import spec. Code named
        inside the run, the recorded spec or the exported program, is used only under the rules of
        :mod:`trajscope.trust`: ``trust=True``, an allow-listed spec, or the run signed by this user.
        """
        meta = self.attrs["model"]
        policy = TrustPolicy(self.path, self.attrs, trust)
        if spec is not None:
            model = specs.build_model(spec, specs.parse_kwargs(kwargs))
        elif meta.get("spec"):
            policy.require("model", meta["spec"], "--model package.module:factory")
            model = specs.build_model(meta["spec"], meta.get("kwargs"))
        elif meta.get("exported"):
            path = self.reader.path / meta["exported"]
            if not path.exists():
                raise TrajscopeError(f"{path} is missing: pass --model package.module:factory")
            policy.require_program(path)
            model = specs.load_exported(str(path))
        else:
            why = meta.get("export_error") or "no model_spec was given to the Recorder"
            raise TrajscopeError(
                f"{self.path} does not say how to rebuild its model ({why}): pass --model package.module:factory"
            )
        self._check_model(model)
        return model.eval()

    def _check_model(self, model: nn.Module) -> None:
        have = {n: tuple(p.shape) for n, p in model.named_parameters()}
        want = self.param_shapes
        for name, shape in want.items():
            if name not in have:
                raise TrajscopeError(
                    f"the model has no parameter {name!r} that the run recorded (shape {list(shape)}): "
                    f"pass the --model that was trained"
                )
            if have[name] != tuple(shape):
                raise TrajscopeError(
                    f"parameter {name!r} has shape {list(have[name])} in the model but {list(shape)} "
                    f"in the run: pass the --model that was trained"
                )
        extra = sorted(set(have) - set(want))
        if extra:
            raise TrajscopeError(
                f"the model has parameter {extra[0]!r} that the run did not record: pass the --model that was trained"
            )

    def loss_fn(
        self, spec: str | None = None, kwargs: str | Mapping[str, Any] | None = None, *, trust: bool = False
    ) -> Callable:
        """The recorded loss (or ``spec``/``kwargs`` chosen by the caller), under :mod:`trajscope.trust`."""
        desc = self.attrs.get("loss")
        if spec is None and desc is not None:
            named = loss_spec(desc)
            if named is None:
                raise TrajscopeError(
                    f"{self.path}: the run's loss description is malformed ({desc!r}): "
                    f"pass --loss package.module:LossClass"
                )
            TrustPolicy(self.path, self.attrs, trust).require("loss", named, "--loss package.module:LossClass")
        return specs.build_loss(desc, spec, kwargs)

    def replay_loss(
        self, ckpt: Checkpoint, model: nn.Module, loss_fn: Callable, batch: Any = None, train_mode: str = "replay"
    ) -> torch.Tensor:
        """L(θ_t) on the checkpoint's batch (or ``batch``), parameters substituted functionally; train-mode
        layers replayed as the step ran them (``train_mode="replay"``, see
        :mod:`trajscope.replay.trainmode`) or the model in eval mode (``"off"``)."""
        from trajscope.replay import trainmode as replay

        inputs, targets = batch if batch is not None else ckpt.batch
        device = next((p.device for p in ckpt.params.values()), torch.device("cpu"))
        rp, _ = replay.plan(
            model,
            ckpt.forward,
            inputs,
            device,
            mode=train_mode,
            probe=batch is not None,
            recorded_sensitive=self.attrs["model"].get("mode_sensitive"),
        )
        with torch.no_grad():
            return loss_fn(rp.forward(model, ckpt.params, ckpt.buffers, inputs), targets)


def open_run(path: str | Path) -> Run:
    """Open a recorded run folder (the folder that holds ``trajectory.zarr``)."""
    return Run(path)
