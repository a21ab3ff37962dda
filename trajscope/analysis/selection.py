"""Which node layers and which checkpoints of a run are analysed (``--modules``, ``--steps``, ``--stride``,
``--all-steps``), and the label horizon K those checkpoints span."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trajscope.analysis.options import AnalysisOptions, range_text
from trajscope.errors import TrajscopeError
from trajscope.nodes import NodeLayer, matches
from trajscope.replay.run import Run, open_run


# --------------------------------------------------------------------------- node layers
def recorded_node_layers(run: Run, include: Sequence[str] | None = None) -> list[NodeLayer]:
    """Node layers from the table the Recorder wrote (works for import-spec and exported models)."""
    table = run.attrs["model"].get("node_layers", [])
    out = [NodeLayer(**{**d, "conv": _tuples(d["conv"])}) for d in table if not include or matches(d["name"], include)]
    if include and not out:
        names = [d["name"] for d in table]
        raise TrajscopeError(
            f"--modules {' '.join(include)} matches no Linear/Conv module of the run "
            f"(it has: {', '.join(names) or 'none'})"
        )
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


def horizon(run: Run, opts: AnalysisOptions) -> int:
    """K: the training steps between analysed checkpoints (the median gap; the recording
    interval when one checkpoint is analysed), over which one checkpoint's map stands for the
    dynamics (labels.resolve_delta)."""
    steps = [s for s, _ in eligible_steps(run, opts, [])]
    if len(steps) > 1:
        return max(1, int(np.median(np.diff(steps))))
    return max(1, int(run.every or 1))


def check_selection(runs: Sequence[Path], opts: AnalysisOptions) -> None:
    """One line, before anything is written, when ``--steps`` selects no checkpoint of any run."""
    spans = []
    for path in runs:
        run = open_run(path)
        if eligible_steps(run, opts, []):
            return
        if len(run.steps):
            spans.append(f"{run.path.name}: {int(run.steps[0])}..{int(run.steps[-1])}")
    raise TrajscopeError(
        f"--steps {range_text(opts.steps)} selects no recorded checkpoint (recorded steps {'; '.join(spans) or 'none'})"
    )
