"""``trajscope analyze``: replay each recorded checkpoint and compute docs/spec.md §3–§8, write docs/spec.md §9.

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

This module runs the analyses of runs (locking, appending, writing); the steps live beside it:
:mod:`~trajscope.analysis.selection` (which layers and checkpoints), :mod:`~trajscope.analysis.checkpoint`
(one checkpoint, 1.–4.), :mod:`~trajscope.analysis.layer` (one node layer of it),
:mod:`~trajscope.analysis.fidelity` (the run-level checks), :mod:`~trajscope.analysis.attrs` (the results
attributes), :mod:`~trajscope.analysis.progress`; the command line is :mod:`trajscope.cli.analyze`.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from trajscope.analysis.attrs import result_attrs
from trajscope.analysis.checkpoint import Analyser
from trajscope.analysis.fidelity import (
    STEP_SERIES,
    earlier_step_rows,
    grad_fidelity,
    loss_fidelity,
    step_changes,
    train_mode_summary,
)
from trajscope.analysis.layer import NOT_COMPUTED
from trajscope.analysis.options import AnalysisOptions
from trajscope.analysis.progress import analysis_progress
from trajscope.analysis.selection import check_selection, eligible_steps, recorded_node_layers
from trajscope.dynamics.labels import LabelConfig, StableLabelState
from trajscope.errors import DamagedRecordError, TrajscopeError
from trajscope.io.layout import find_runs, local_run_path
from trajscope.io.results import (
    NODE_FLOAT,
    NODE_INT,
    NODE_U8,
    UNSET_INT,
    discard_partial_stores,
    open_results,
    results_exist,
)
from trajscope.io.resultswriter import ResultsWriter
from trajscope.io.runlock import analysis_lock
from trajscope.io.tbevents import EventWriter
from trajscope.nodes import NodeLayer
from trajscope.replay.run import Checkpoint, Run, open_run

__all__ = ["RunSummary", "analyze", "analyze_run", "eligible_steps", "recorded_node_layers", "NOT_COMPUTED"]


@dataclass
class RunSummary:
    run: Path
    analysed: list[int]
    results: Any
    kinematics_only: bool = False
    notes: list[str] = field(default_factory=list)
    mismatches: dict[int, float] = field(default_factory=dict)  # step -> relative replayed/recorded loss gap
    step_rows: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> STEP_SERIES values


# --------------------------------------------------------------------------- one run
def analyze_run(path: str | Path, opts: AnalysisOptions, console: Console | None = None) -> RunSummary:
    """Analyse the new checkpoints of one run; returns what was done."""
    console = console or Console(stderr=True)
    run = open_run(path)
    if not len(run.steps):
        raise TrajscopeError(f"{run.path} has no committed checkpoint yet: nothing to analyse")
    an = Analyser(run, opts)
    # One analysis of a run at a time: the second waits, then analyses what is still new.
    with analysis_lock(run.path, on_wait=lambda msg: print(f"trajscope: {msg}", file=sys.stderr, flush=True)):
        return _analyze_locked(run, an, opts, console)


def _analyze_locked(run: Run, an: Analyser, opts: AnalysisOptions, console: Console) -> RunSummary:
    layers = {l.name: l.n_nodes for l in an.layers}
    prev = _previous(run, an, opts)
    done = [int(s) for s in prev.steps] if prev is not None else []
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
    first_norms, stable = _resume(prev, done, layers, opts)
    ck0 = _first_readable_checkpoint(run, todo)
    if not an.kinematics_only:
        an.preflight(ck0)
    rules0 = an.rules(ck0)
    maps0 = {l.name: an.node_map(l, rules0).note for l in an.layers}
    summary.notes += _map_notes(rules0, maps0)
    writer = ResultsWriter(run.path, result_attrs(run, an, opts, rules0, maps0), layers, expected=len(todo))
    events = EventWriter(run.path, list(layers))
    try:
        with analysis_progress(console, opts.progress) as progress:
            task = progress.add_task(f"{run.path.name}", total=len(todo))
            for step, succ in todo:
                first_norms = _append_step(an, step, succ, first_norms, stable, summary, writer, events)
                progress.advance(task)
        _finish(an, opts, prev, summary, writer)
    finally:
        writer.close()
        events.close()
    summary.results = open_results(run.path)
    return summary


def _previous(run: Run, an: Analyser, opts: AnalysisOptions) -> Any:
    """The run's earlier results (None: none yet), after checking that appended labels keep their rule and δ
    (``an.delta`` becomes the stored δ)."""
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
        raise TrajscopeError(
            f"{run.path} was analysed with label preset {was!r}; appended labels must use the same: "
            f"pass --preset {was}, or move {run.path / 'analysis.zarr'} aside to re-analyse from scratch"
        )
    if "delta" in attrs:
        if opts.labels.delta is not None and not math.isclose(opts.labels.delta, attrs["delta"]):
            raise TrajscopeError(
                f"{run.path} was analysed with delta {attrs['delta']:g}; appended labels must use the "
                f"same: drop --delta, or move {run.path / 'analysis.zarr'} aside to re-analyse from scratch"
            )
        an.delta = float(attrs["delta"])
    return prev


def _resume(
    prev: Any, done: Sequence[int], layers: Mapping[str, int], opts: AnalysisOptions
) -> tuple[dict[str, torch.Tensor], StableLabelState]:
    """First norms (collapse reference) and label history for stable labels, from earlier analyses."""
    first_norms: dict[str, torch.Tensor] = {}
    stable = StableLabelState(layers, opts.labels.stable_window)
    if prev is not None and len(done):
        damaged = prev.global_series("damaged") if "damaged" in prev.global_names else np.zeros(len(done))
        first = int(np.argmax(damaged != 1)) if (damaged != 1).any() else None
        for l in layers:
            if first is not None:  # the collapse reference: the first row that is not damaged
                first_norms[l] = torch.from_numpy(np.asarray(prev.node(l, "param_norm", first), np.float64))
            stable.resume(l, prev.node(l, "label"), prev.node(l, "stable_label", len(done) - 1))
    return first_norms, stable


def _map_notes(rules0: Sequence[Any], maps0: Mapping[str, str | None]) -> list[str]:
    """The summary's lines on the update maps of the run (per layer, and no map for the optimizer)."""
    notes = [f"{name}: {note}" for name, note in maps0.items() if note]
    if any(r.kind == "gd_fallback" for r in rules0):
        notes.append(
            f"WARNING: trajscope has no update map for {rules0[0].optimizer.rsplit('.', 1)[-1]}: the "
            f"spectra, thresholds and labels use plain gradient descent with the group's lr"
        )
    return notes


def _append_step(
    an: Analyser,
    step: int,
    succ: int | None,
    first_norms: dict[str, torch.Tensor],
    stable: StableLabelState,
    summary: RunSummary,
    writer: ResultsWriter,
    events: EventWriter,
) -> dict[str, torch.Tensor]:
    """Analyse one checkpoint and append its row (a NaN row where it failed); returns the first norms."""
    try:
        glob, nodes = an.checkpoint(step, succ, first_norms)
    except Exception as e:
        # Local failure (docs/spec.md §10): this row is NaN and says so; the other steps go on.
        if isinstance(e, TrajscopeError) and not isinstance(e, DamagedRecordError):
            raise  # bad input that holds for every step: one line, not a row per step
        marker = "damaged" if isinstance(e, DamagedRecordError) else "failed"
        why = str(e) if marker == "damaged" else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"step {step}: {why}; its row is NaN (global/{marker} = 1)")
        summary.notes.append(f"step {step} not analysed: {why}")
        writer.append(step, *_nan_row(an.layers, marker))
        summary.analysed.append(step)
        return first_norms
    if not first_norms:  # the first analysed row is the collapse reference of the run
        first_norms = {l: torch.from_numpy(nodes[l]["param_norm"].astype(np.float64)) for l in nodes}
    for l in nodes:
        nodes[l]["stable_label"] = stable.update(l, nodes[l]["label"], hysteresis=not an.kinematics_only)
    if "loss_mismatch" in glob:
        summary.mismatches[step] = glob["loss_mismatch"]
    if "step_factor" in glob:
        summary.step_rows[step] = {k: glob[k] for k in STEP_SERIES}
    writer.append(step, glob, nodes)
    events.write(step, glob, nodes)
    summary.analysed.append(step)
    return first_norms


def _finish(an: Analyser, opts: AnalysisOptions, prev: Any, summary: RunSummary, writer: ResultsWriter) -> None:
    """The run-level checks over every analysed step (this analysis and the earlier ones): summary notes and
    results attributes."""
    earlier = (
        {int(st): float(m) for st, m in zip(prev.steps, prev.global_series("loss_mismatch")) if np.isfinite(m)}
        if prev is not None and "loss_mismatch" in prev.global_names
        else {}
    )
    replayed = train_mode_summary(an, opts)
    summary.notes += replayed["notes"]
    fidelity = loss_fidelity({**earlier, **summary.mismatches})
    if fidelity["note"]:
        summary.notes.append(fidelity["note"])
    summary.notes += an.failures
    rows = {**earlier_step_rows(prev), **summary.step_rows}
    fidelity["grad_norm"], changes = grad_fidelity(rows), step_changes(rows)
    summary.notes += [n for n in (*changes["notes"], fidelity["grad_norm"]["note"]) if n]
    writer.update_attrs(
        fidelity=fidelity, step_changes=changes, train_mode_replay={k: v for k, v in replayed.items() if k != "notes"}
    )
    # the WARNING lines of every analysis of the run, for the dashboard (earlier ones first, once each)
    said = list(prev.attrs.get("warnings", [])) if prev is not None else []
    writer.update_attrs(warnings=said + [n for n in summary.notes if n.startswith("WARNING") and n not in said])


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
def analyze(
    paths: str | Path | Sequence[str | Path], *, console: Console | None = None, **options: Any
) -> dict[Path, Any]:
    """Analyse run folders (or folders of runs). Returns ``{run folder: trajscope.io.results.Results}``.

    Keyword options are the fields of :class:`AnalysisOptions`; label options may be given either as
    ``labels=LabelConfig(...)`` or flat (``preset=``, ``delta=``, ``collapse_ratio=``, ...).
    """
    opts = _options(**options)
    return {s.run: s.results for s in analyze_many(paths, opts, console)}


def _options(**options: Any) -> AnalysisOptions:
    label_keys = set(LabelConfig.__dataclass_fields__)
    label_kw = {k: options.pop(k) for k in list(options) if k in label_keys}
    if label_kw:
        options["labels"] = LabelConfig(**label_kw)
    options.setdefault("progress", False)
    return AnalysisOptions(**options)


def analyze_many(
    paths: str | Path | Sequence[str | Path], opts: AnalysisOptions, console: Console | None
) -> list[RunSummary]:
    """Analyse every run under ``paths`` (run folders or folders of runs); one summary per run, in order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if any(not str(p).strip() for p in paths):
        raise TrajscopeError("an empty path was given: name a run folder or a folder of runs")
    for p in map(local_run_path, paths):
        if not p.exists():
            raise TrajscopeError(f"{p} does not exist: give a run folder or a folder of runs")
    runs = find_runs(paths)
    if not runs:
        raise TrajscopeError(
            f"no trajscope run under {', '.join(map(str, paths))}: a run folder holds trajectory.zarr (written by trajscope.Recorder)"
        )
    if opts.steps is not None:
        check_selection(runs, opts)
    return [analyze_run(r, opts, console) for r in runs]
