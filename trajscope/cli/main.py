"""The ``trajscope`` command (also ``python -m trajscope``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trajscope import __version__
from trajscope.errors import TrajscopeError

DESCRIPTION = """\
Record a PyTorch training trajectory with trajscope.Recorder, then replay it offline:
per-node (neuron) curvature blocks, update-map spectra, decay ratio and drift, node labels
(healthy sink, degenerate sink, plateau, source) and global sharpness, written to
RUN/analysis.zarr and TensorBoard event files in RUN/.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with bad input answered in one line (docs/spec.md §10), pointing at ``--help``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trajscope", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"trajscope {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _info_commands(sub)
    pa = _analyze_command(sub)
    _selection_options(pa)
    _label_options(pa)
    _execution_options(pa)
    return p


def _info_commands(sub: argparse._SubParsersAction) -> None:
    """``trajscope info`` and ``trajscope verify``."""
    pi = sub.add_parser(
        "info",
        help="summarise a recorded run",
        description="Summarise a recorded run: steps and "
        "cadence, skipped steps, parameters and nodes per layer, batches, optimizer, loss, model capture, size.",
    )
    pi.add_argument("run", help="run folder (the folder holding trajectory.zarr)")
    pi.add_argument(
        "--verify", action="store_true", help="also read every record and check its checksum (as `trajscope verify`)"
    )

    pv = sub.add_parser(
        "verify",
        help="check every record of a run against its checksum",
        description="Read every committed record of RUN/trajectory.zarr and check its CRC32C checksum; "
        "exits non-zero naming the first damaged step.",
    )
    pv.add_argument("run", help="run folder (the folder holding trajectory.zarr)")


def _analyze_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``trajscope analyze PATH...`` (its option groups are added below)."""
    pa = sub.add_parser(
        "analyze",
        help="analyse recorded runs (per-node curvature, spectra, labels, sharpness)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replay recorded checkpoints and write RUN/analysis.zarr and TensorBoard events in RUN/.\n"
        "Re-running on a run that grew analyses only the new checkpoints.",
        epilog="example:\n  trajscope analyze runs/            # every run under runs/\n  tensorboard --logdir runs/",
    )
    pa.add_argument(
        "paths", nargs="+", metavar="PATH", help="run folders, or folders of run folders (like a TensorBoard logdir)"
    )
    return pa


def _selection_options(pa: argparse.ArgumentParser) -> None:
    """What to analyse: layers, steps, batch, curvature kind, train-mode replay."""
    g = pa.add_argument_group("what to analyse")
    g.add_argument(
        "--modules",
        nargs="+",
        metavar="NAME",
        help="node layers to analyse (module names or glob patterns; default: every Linear, Conv, HF Conv1D, Embedding and attention projection)",
    )
    g.add_argument(
        "--steps", metavar="A:B", help="step range A:B, A: or :B, e.g. 100:500 (inclusive start, exclusive end)"
    )
    g.add_argument("--stride", type=int, default=1, help="analyse every N-th eligible checkpoint (default 1)")
    g.add_argument(
        "--all-steps",
        action="store_true",
        help="also analyse checkpoints whose successor is not the next step (kinematics then span k steps)",
    )
    g.add_argument(
        "--batch",
        choices=("step", "probe"),
        default="step",
        help="curvature on each step's mini-batch (default) or the fixed probe batch",
    )
    g.add_argument(
        "--curvature",
        choices=("ggn", "exact"),
        default="ggn",
        help="node blocks: Gauss-Newton (default) or exact Hessian",
    )
    g.add_argument("--no-sharpness", action="store_true", help="skip the global sharpness (Lanczos) computation")
    g.add_argument(
        "--fractions",
        action="store_true",
        help="also write, per node, the fractions of its motion along the "
        "neutral and the unstable directions of its map (neutral_fraction, unstable_fraction; one dense "
        "p x p eigendecomposition per node: slow for wide layers)",
    )
    g.add_argument(
        "--train-mode",
        choices=("replay", "off"),
        default="replay",
        help="modules that trained in train mode (BatchNorm, dropout): replayed as trained, with batch "
        "statistics and the recorded dropout masks (default), or 'off': the whole model in eval mode",
    )


def _label_options(pa: argparse.ArgumentParser) -> None:
    """The label rules (docs/spec.md §7)."""
    lab = pa.add_argument_group("labels")
    lab.add_argument(
        "--preset",
        choices=("excited", "acted", "seed"),
        default="excited",
        help="label rules (docs/spec.md section 7, docs/concepts.md): 'excited' (default) judges a "
        "node by the directions its recorded motion excites (source if the motion grows, plateau if "
        "dead or moving flatly without reducing the loss), delta = min(1/K, 0.01) for K steps between "
        "analysed checkpoints; 'acted' by every direction the step acts on (plateau if any is within "
        "delta of |mu|=1; the rule before the label-validity benchmark), delta = min(1/T, 0.01) for T "
        "recorded steps; 'seed' by the theory note's literal recipe (docs/theory.md section 7): all p "
        "directions including the ones the step does not act on, |mu| in [0.99, 1.01] neutral, "
        "plateau also when the gradient norm is < 1e-6 while the loss is > 1e-4 or the smallest "
        "curvature is < 1e-4, collapsed below an absolute norm of 1e-4",
    )
    lab.add_argument(
        "--delta",
        type=float,
        help="neutral band around |mu|=1, finite and >= 0 (default: 1/K for K steps "
        "between analysed checkpoints, at most 0.01; docs/concepts.md)",
    )
    lab.add_argument(
        "--share-min",
        type=float,
        default=0.01,
        help="excited preset: a flat-moving node is a plateau when "
        "its share of the step's loss decrease is below this fraction of an equal share (default 0.01)",
    )
    lab.add_argument(
        "--collapse-ratio",
        type=float,
        default=0.1,
        help="degenerate sink when ||theta_i|| <= ratio * reference, ratio in [0, 1) (default 0.1)",
    )
    lab.add_argument(
        "--collapse-reference",
        choices=("first", "layer_median"),
        default="first",
        help="reference norm for collapse (default: the node's first analysed norm)",
    )
    lab.add_argument(
        "--stable-window",
        type=int,
        default=3,
        help="checkpoints a label must persist to become the stable label (default 3)",
    )


def _execution_options(pa: argparse.ArgumentParser) -> None:
    """Device, precision, the code that replays the run, trust, progress."""
    ex = pa.add_argument_group("execution")
    ex.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ex.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help="analysis precision (default float32)"
    )
    ex.add_argument(
        "--model", metavar="MODULE:FACTORY", help="rebuild the model with this factory instead of the recorded spec"
    )
    ex.add_argument("--model-args", metavar="JSON", help="JSON keyword arguments for --model")
    ex.add_argument("--loss", metavar="MODULE:CLASS", help="loss class or function instead of the recorded one")
    ex.add_argument("--loss-args", metavar="JSON", help="JSON keyword arguments for --loss")
    ex.add_argument(
        "--trust",
        action="store_true",
        help="allow the code the run names (model factory, loss, exported program) even when the run is not "
        "signed by you: a run is data, trust only runs from people you trust",
    )
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "info":
            from trajscope.cli.info import info

            info(args.run, verify=args.verify)
            return 0
        if args.command == "verify":
            from trajscope.cli.info import verify

            verify(args.run)
            return 0
        if args.command == "analyze":
            from trajscope.cli.analyze import analyze_cli

            return analyze_cli(args)
    except TrajscopeError as e:
        print(f"trajscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trajscope: interrupted; analysed checkpoints so far are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
