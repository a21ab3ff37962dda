"""``trajscope analyze`` on the command line: arguments -> options, then the summary tables, notes and the
``tensorboard --logdir`` line."""

from __future__ import annotations

import os
import shlex
import time
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trajscope.analysis.options import AnalysisOptions, parse_steps
from trajscope.analysis.pipeline import RunSummary, analyze_many
from trajscope.dynamics.labels import LABELS, LabelConfig


def _summary_table(s: RunSummary) -> Table:
    res = s.results
    t = Table(
        title=f"{escape(str(s.run))}  ({len(s.analysed)} new checkpoint{'s' if len(s.analysed) != 1 else ''}, "
        f"{len(res.steps) if res is not None else 0} in all)",
        title_justify="left",
    )
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


def options_from_args(args: Any) -> AnalysisOptions:
    """The analysis options of a ``trajscope analyze`` command line (argparse namespace from :mod:`trajscope.cli.main`)."""
    steps = parse_steps(args.steps) if args.steps is not None else None
    labels = LabelConfig(
        preset=args.preset,
        delta=args.delta,
        collapse_ratio=args.collapse_ratio,
        collapse_reference=args.collapse_reference,
        stable_window=args.stable_window,
        share_min=args.share_min,
    )
    return AnalysisOptions(
        modules=args.modules,
        steps=steps,
        stride=args.stride,
        all_steps=args.all_steps,
        batch=args.batch,
        curvature=args.curvature,
        sharpness=not args.no_sharpness,
        motion_fractions=args.fractions,
        train_mode=args.train_mode,
        labels=labels,
        device=args.device,
        dtype=args.dtype,
        model=args.model,
        model_args=args.model_args,
        loss=args.loss,
        loss_args=args.loss_args,
        trust=args.trust,
        progress=not args.no_progress,
    )


def _print_run(console: Console, s: RunSummary) -> None:
    """One run's table, its last step's global values and its notes."""
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


def analyze_cli(args: Any) -> int:
    """Entry point for ``trajscope analyze`` (argparse namespace from :mod:`trajscope.cli.main`)."""
    opts = options_from_args(args)
    console = Console()
    t0 = time.perf_counter()
    summaries = analyze_many(args.paths, opts, Console(stderr=True))
    for s in summaries:
        _print_run(console, s)
    # Plain print, not rich: the command must survive pipes (no wrapping) and odd folder names (no markup).
    logdir = os.path.commonpath([str(s.run.parent.resolve()) for s in summaries])
    print(
        f"analysed {sum(len(s.analysed) for s in summaries)} checkpoints of {len(summaries)} run(s) in "
        f"{time.perf_counter() - t0:.1f} s; results: RUN/analysis.zarr and RUN/events.out.tfevents.* in each run folder"
    )
    print(f"view them with:  tensorboard --logdir {shlex.quote(logdir)}")
    return 0
