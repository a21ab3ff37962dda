"""``trajscope info RUN``: a readable summary of a recorded run."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from trajscope.run import Run, open_run


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _steps_text(run: Run) -> str:
    steps = run.steps
    if not len(steps):
        return "none committed yet"
    return f"{len(steps)} recorded, steps {steps[0]}..{steps[-1]} (every {run.every}, window {run.window})"


def summary_tables(run: Run) -> list[Table]:
    """The tables ``trajscope info`` prints."""
    a = run.attrs
    overview = Table(title=f"trajscope run {run.path}", show_header=False, title_justify="left")
    overview.add_column("what", style="bold")
    overview.add_column("value")
    overview.add_row("steps", _steps_text(run))
    overview.add_row("last committed step", str(run.steps[-1]) if len(run.steps) else "-")
    sk = run.skipped_steps
    overview.add_row("skipped steps", f"{len(sk)}" + (f" ({', '.join(map(str, sk[:8]))}{', ...' if len(sk) > 8 else ''})" if len(sk) else ""))
    if run.restarts:
        overview.add_row("restarts", "; ".join(f"at step {r['at_step']} (dropped {r['dropped_records']})" for r in run.restarts))
    opt = a["optimizer"]
    overview.add_row("optimizer", f"{opt['name']} ({len(opt['groups'])} param group{'s' if len(opt['groups']) != 1 else ''})")
    if len(run.steps):
        hp = run.reader.hparams(len(run.steps) - 1)
        shown = {k: v for k, v in hp[0].items() if k in ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay")}
        overview.add_row("hyperparameters (last, group 0)", ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    loss = a.get("loss")
    overview.add_row("loss", (loss.get("class") or loss.get("function")) + (f" {loss.get('kwargs')}" if loss.get("kwargs") else "") if loss else "not recorded (pass --loss to analyze)")
    m = a["model"]
    kinds = []
    if m.get("spec"):
        kinds.append(f"import spec {m['spec']} {m.get('kwargs') or ''}".strip())
    if m.get("exported"):
        kinds.append("torch.export program (needs --trust to load)")
    overview.add_row("model capture", "; ".join(kinds) if kinds else f"none ({m.get('export_error')}); pass --model to analyze")
    batch = a.get("batch")
    if batch is None:
        overview.add_row("batches", "none recorded: analysis gives kinematics only")
    elif len(run.steps):
        b = run.reader.batch(len(run.steps) - 1)
        overview.add_row("batch (last)", _describe_batch(b) if b is not None else "none (batch() was not called for that step)")
    overview.add_row("probe batch", "yes" if "probe" in a else "no")
    overview.add_row("size on disk", _size(run.reader.disk_bytes()))

    layers = Table(title="parameters", title_justify="left")
    for col in ("parameter", "shape", "dtype", "nodes"):
        layers.add_column(col, justify="right" if col == "nodes" else "left")
    node_layers = {n["name"] for n in m.get("node_layers", [])}
    for name, shape in run.param_shapes.items():
        module, _, leaf = name.rpartition(".")
        nodes = str(shape[0]) if module in node_layers and leaf == "weight" else ""
        layers.add_row(name, "×".join(map(str, shape)) or "scalar", run.param_dtypes[name], nodes)
    return [overview, layers]


def _describe_batch(b) -> str:
    import torch

    def d(o):
        if isinstance(o, torch.Tensor):
            return f"{list(o.shape)} {str(o.dtype).removeprefix('torch.')}"
        if isinstance(o, (tuple, list)):
            return "(" + ", ".join(d(x) for x in o) + ")"
        if isinstance(o, dict):
            return "{" + ", ".join(f"{k}: {d(v)}" for k, v in o.items()) + "}"
        return repr(o)

    return f"inputs {d(b[0])}, targets {d(b[1])}"


def info(path: str | Path, console: Console | None = None) -> None:
    console = console or Console()
    for t in summary_tables(open_run(path)):
        console.print(t)
