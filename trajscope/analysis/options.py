"""The options of an analysis (``trajscope analyze`` and :func:`trajscope.analyze`), checked on
construction: every bad value is one line before anything is read or written (docs/spec.md §10)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trajscope.dynamics.labels import LabelConfig
from trajscope.errors import TrajscopeError
from trajscope.io import specs


@dataclass
class AnalysisOptions:
    """Options of ``trajscope analyze`` (see ``trajscope analyze --help``)."""

    modules: Sequence[str] | None = None
    steps: tuple[int | None, int | None] | None = None
    stride: int = 1
    all_steps: bool = False
    batch: str = "step"  # "step" | "probe"
    curvature: str = "ggn"  # "ggn" | "exact"
    sharpness: bool = True
    motion_fractions: bool = False  # per node: the motion's fractions along neutral / unstable directions
    train_mode: str = "replay"  # "replay" (train-mode layers as trained) | "off" (eval mode)
    labels: LabelConfig = field(default_factory=LabelConfig)
    device: str = "cpu"
    dtype: str = "float32"
    model: str | None = None
    model_args: str | Mapping[str, Any] | None = None
    loss: str | None = None
    loss_args: str | Mapping[str, Any] | None = None
    trust: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("batch", self.batch, ("step", "probe")),
            ("curvature", self.curvature, ("ggn", "exact")),
            ("train_mode", self.train_mode, ("replay", "off")),
            ("dtype", self.dtype, ("float32", "float64")),
        ):
            if value not in choices:
                raise TrajscopeError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise TrajscopeError(f"stride must be an integer >= 1, got {self.stride!r}")
        if self.steps is not None:
            lo, hi = self.steps
            if lo is None and hi is None:
                raise TrajscopeError("a step range needs a start, an end or both, e.g. 100:500")
            if any(v is not None and v < 0 for v in (lo, hi)):
                raise TrajscopeError(f"steps are >= 0, got {range_text(self.steps)}")
            if lo is not None and hi is not None and hi <= lo:
                raise TrajscopeError(
                    f"step range {range_text(self.steps)} is empty (the end is exclusive): give A:B with B > A"
                )
        for name, text, spec in (("model", self.model_args, self.model), ("loss", self.loss_args, self.loss)):
            if text is not None and spec is None:
                raise TrajscopeError(
                    f"--{name}-args is given without --{name}: name the {name} those arguments are for"
                )
            if text is not None:
                specs.parse_kwargs(text)  # one line now for bad JSON, not after the model is built
        self.device = check_device(self.device)


def range_text(steps: tuple[int | None, int | None]) -> str:
    return ":".join("" if v is None else str(v) for v in steps)


def parse_steps(text: str) -> tuple[int | None, int | None]:
    """``A:B``, ``A:`` or ``:B`` (inclusive start, exclusive end) as a pair."""
    lo, colon, hi = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return (int(lo) if lo.strip() else None, int(hi) if hi.strip() else None)
    except ValueError:
        raise TrajscopeError(
            f"--steps {text!r} must look like A:B, A: or :B, e.g. 100:500 (step 5 alone: 5:6)"
        ) from None


def check_device(name: str) -> str:
    """The analysis device, or one line saying why it cannot be used."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise TrajscopeError(f"--device {name!r} is not a torch device: use cpu or cuda (cuda:N)") from None
    if dev.type == "meta":
        raise TrajscopeError("--device meta holds no data, so nothing can be computed on it: use cpu or cuda")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise TrajscopeError("--device cuda was asked for but torch sees no CUDA device: use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise TrajscopeError(
                f"--device {name} was asked for but torch sees {n} CUDA device(s): use cuda:0 .. cuda:{n - 1}"
            )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise TrajscopeError("--device mps was asked for but torch sees no MPS device: use --device cpu")
    try:
        torch.empty(1, device=dev)
    except Exception as e:  # a device type torch knows but has no backend for in this process
        raise TrajscopeError(
            f"--device {name}: torch cannot place tensors there ({type(e).__name__}): use cpu or cuda"
        ) from None
    return name
