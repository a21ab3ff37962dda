"""``trajscope info RUN``: a readable summary of a recorded run; ``trajscope verify RUN``: its integrity.

:func:`info` also checks the run's structure without reading its records (every array document,
every shard file the committed records were written to, its index checksum and length; the
analysis store's documents) so that a damaged run is an error, not a summary.
:func:`verify` reads every committed record and checks every checksum (format version 3 stores;
version 2 stores have none, and only their structure and readability are checked).
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from trajscope.errors import DamagedRecordError, TrajscopeError
from trajscope.io import results
from trajscope.replay.run import Run, open_run
from trajscope.trust import TrustPolicy, loss_spec
from trajscope.trust import allowed as trust_allowed


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


def summary_tables(run: Run, analysis: str | None = None) -> list[Table]:
    """The tables ``trajscope info`` prints (``analysis``: the analysis store's row, if known)."""
    overview = Table(title=f"trajscope run {run.path}", show_header=False, title_justify="left")
    overview.add_column("what", style="bold")
    overview.add_column("value")
    overview.add_row("steps", _steps_text(run))
    overview.add_row("last committed step", str(run.steps[-1]) if len(run.steps) else "-")
    sk = run.skipped_steps
    overview.add_row(
        "skipped steps",
        f"{len(sk)}" + (f" ({', '.join(map(str, sk[:8]))}{', ...' if len(sk) > 8 else ''})" if len(sk) else ""),
    )
    if run.restarts:
        overview.add_row(
            "restarts", "; ".join(f"at step {r['at_step']} (dropped {r['dropped_records']})" for r in run.restarts)
        )
    _training_rows(overview, run)
    _capture_rows(overview, run, analysis)
    return [overview, _parameter_table(run)]


def _training_rows(overview: Table, run: Run) -> None:
    """Optimizer, its last hyperparameters, the loss."""
    a = run.attrs
    opt = a["optimizer"]
    overview.add_row(
        "optimizer", f"{opt['name']} ({len(opt['groups'])} param group{'s' if len(opt['groups']) != 1 else ''})"
    )
    if len(run.steps):
        hp = run.reader.hparams(len(run.steps) - 1)
        shown = {
            k: v
            for k, v in hp[0].items()
            if k in ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay")
        }
        overview.add_row(
            "hyperparameters (last, group 0)",
            ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()),
        )
    loss = a.get("loss")
    overview.add_row(
        "loss",
        (loss.get("class") or loss.get("function")) + (f" {loss.get('kwargs')}" if loss.get("kwargs") else "")
        if loss
        else "not recorded (pass --loss to analyze)",
    )


def _capture_rows(overview: Table, run: Run, analysis: str | None) -> None:
    """How the run can be replayed: model capture, ranks, batches, trusted code, probe, size, checksums."""
    a = run.attrs
    m = a["model"]
    kinds = []
    if m.get("spec"):
        kw = m.get("kwargs") or ""
        if isinstance(kw, dict) and isinstance(kw.get("config"), dict):  # a transformers config: its class
            kw = {**kw, "config": f"<{kw['config'].get('model_type', '?')} config, {len(kw['config'])} fields>"}
        kinds.append(f"import spec {m['spec']} {kw}".strip())
    if m.get("exported"):
        kinds.append("torch.export program")
    overview.add_row(
        "model capture", "; ".join(kinds) if kinds else f"none ({m.get('export_error')}); pass --model to analyze"
    )
    batch = a.get("batch")
    missing = run.reader.missing_shards()
    if "distributed" in a:
        overview.add_row("distributed", _distributed_text(run, missing))
    readable = np.nonzero(~np.isin(run.steps, np.concatenate([np.zeros(0, np.int64), *missing.values()])))[0]
    if batch is None:
        overview.add_row("batches", "none recorded: analysis gives kinematics only")
    elif len(readable):
        b = run.reader.batch(int(readable[-1]))
        overview.add_row(
            "batch (last)", _describe_batch(b) if b is not None else "none (batch() was not called for that step)"
        )
    overview.add_row("code named by the run", _trust_text(run))
    overview.add_row("probe batch", "yes" if "probe" in a else "no")
    overview.add_row("size on disk", _size(run.reader.disk_bytes()))
    overview.add_row(
        "checksums",
        "CRC32C per chunk (check them all: trajscope verify)"
        if run.reader.checksums
        else f"none (format version {run.reader.format_version})",
    )
    if analysis is not None:
        overview.add_row("analysis", analysis)


def _parameter_table(run: Run) -> Table:
    """Parameters with shape, dtype and the node count of each node layer's weight."""
    m = run.attrs["model"]
    layers = Table(title="parameters", title_justify="left")
    for col in ("parameter", "shape", "dtype", "nodes"):
        layers.add_column(col, justify="right" if col == "nodes" else "left")
    # the node count sits on each node layer's weight (N is not always its dim 0: HF Conv1D, tied weights)
    node_counts = {n["weight"]: n["n_nodes"] for n in m.get("node_layers", []) if "weight" in n}
    for name, shape in run.param_shapes.items():
        nodes = str(node_counts[name]) if name in node_counts else ""
        layers.add_row(name, "×".join(map(str, shape)) or "scalar", run.param_dtypes[name], nodes)
    return layers


def _distributed_text(run: Run, missing: dict[int, np.ndarray]) -> str:
    """The ranks of a distributed run and the steps a rank's batch shard is missing for."""
    world = int(run.attrs["distributed"]["world_size"])
    text = f"{world} ranks: rank 0 recorded parameters and state, each rank its batch shard (a step's batch is their union)"
    gaps = [
        f"rank {k} lacks {len(m)} step(s) ({_steps_list(m)}: damaged steps, not analysed)"
        for k, m in missing.items()
        if len(m)
    ]
    return "; ".join([text, *gaps]) if gaps else f"{text}; every shard present"


def _steps_list(steps: np.ndarray) -> str:
    return ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")


def _trust_text(run: Run) -> str:
    """What analysing the run would import, and whether that needs --trust (trajscope.trust)."""
    m = run.attrs["model"]
    named = [s for s in (m.get("spec"), loss_spec(run.attrs.get("loss"))) if isinstance(s, str)]
    program = ["the exported program"] if m.get("exported") and not m.get("spec") else []
    if TrustPolicy(run.path, run.attrs).signed:
        return "signed by you: analysed without --trust"
    needs = [s for s in named if not trust_allowed(s)] + program
    if not needs:
        return "not signed by you; " + (f"allow-listed ({', '.join(named)})" if named else "names no code")
    return f"not signed by you: analysing imports {', '.join(needs)} only with --trust (or name it: --model/--loss)"


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


def info(path: str | Path, console: Console | None = None, verify: bool = False) -> None:
    """Print the summary of a run. Raises TrajscopeError (DamagedRecordError for one array or
    record) if the run is damaged: its structure is checked first, without reading the records
    (``verify``: every record is read and its checksums checked instead), and so is its analysis
    store, if it has one."""
    console = console or Console()
    run = open_run(path)
    if verify:
        checked = _verify_run(run)
    else:
        run.reader.check_structure()
    analysis = analysis_summary(run.path)
    for t in summary_tables(run, analysis):
        console.print(t)
    if verify:
        console.print(checked)


def verify(path: str | Path, console: Console | None = None) -> None:
    """Read every committed record of the run (every array: parameters, buffers, optimizer state,
    batches, hyperparameters, losses and steps, skipped steps, the probe batch) and check every
    checksum, then the exported program's zip CRCs; print one summary line. Raises
    DamagedRecordError naming the first damaged step (TrajscopeError if the store cannot be opened)."""
    console = console or Console()
    console.print(_verify_run(open_run(path)))


def _verify_run(run: Run) -> str:
    """Verify every record of an open run (see :func:`verify`); the summary line."""
    reader = run.reader
    start = time.perf_counter()
    nbytes = reader.verify_records()
    _check_program(run)
    took = time.perf_counter() - start
    what = (
        f"{run.path}: {reader.n_records} records and {len(reader.skipped)} skipped steps read "
        f"({_size(nbytes)}) in {took:.2f} s"
    )
    if reader.checksums:
        return f"{what}: every checksum matches"
    return (
        f"{what}: every record is present and readable; this store (format version {reader.format_version}) "
        f"has no checksums, so damaged values cannot be detected (runs recorded now have them)"
    )


def _check_program(run: Run) -> None:
    """The exported program is a zip archive: check its members' CRC32s (reading it runs no code)."""
    exported = run.attrs.get("model", {}).get("exported")
    if not exported:
        return
    path = run.reader.path / exported
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except FileNotFoundError:
        bad = "the file is missing"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        bad = f"not a readable zip archive, {type(e).__name__}"
    else:
        bad = bad and f"its member {bad} fails its CRC"
    if bad:
        raise DamagedRecordError(run.reader.path, exported, None, bad)


def analysis_summary(run_dir: Path) -> str:
    """What ``RUN/analysis.zarr`` holds, in a few words; TrajscopeError if it is damaged (its root
    document, or an array document of a store with committed rows, missing or unreadable), with the
    advice to rebuild it. A store that is merely behind the run is not damaged: ``trajscope
    analyze`` goes on from its last analysed checkpoint."""
    path = run_dir / results.STORE_NAME
    if not results.results_exist(run_dir):
        return f"none yet (trajscope analyze {run_dir})"

    def damaged(why: str) -> TrajscopeError:
        return TrajscopeError(
            f"{path}: the analysis store is damaged ({why}): move it aside and run "
            f"`trajscope analyze {run_dir}` to rebuild it"
        )

    attrs = _document(path / "zarr.json", "its zarr.json", damaged).get("attributes")
    if isinstance(attrs, dict) and "trajscope_format" in attrs and _committed(attrs):
        for name in _analysis_arrays(attrs):
            _document(path / name / "zarr.json", f"{name}/zarr.json", damaged)
    res = results.open_results(run_dir)  # another format or version: its own one-line error
    if not len(res):
        return "created, no checkpoint analysed yet"
    if bool(np.any(res.steps < 0)):  # a chunk of ``steps`` read back as its fill value
        raise damaged("chunks of its steps array are missing")
    return f"{len(res)} checkpoints analysed, steps {res.steps[0]}..{res.steps[-1]}"


def _document(path: Path, what: str, damaged) -> dict:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise damaged(f"{what} is missing") from None
    except (OSError, ValueError) as e:
        raise damaged(f"{what} is unreadable, {type(e).__name__}") from None
    if not isinstance(doc, dict):
        raise damaged(f"{what} is not a Zarr document")
    return doc


def _committed(attrs: dict) -> int:
    try:
        return int(attrs.get("committed", 0))
    except (TypeError, ValueError):
        return 0


def _analysis_arrays(attrs: dict) -> list[str]:
    """The arrays every analysis store has (resultswriter.ResultsWriter creates them all at once)."""
    names = ["steps", *(f"global/{g}" for g in results.GLOBAL)]
    layers = [d for d in attrs.get("layers", []) if isinstance(d, dict) and isinstance(d.get("group"), str)]
    return names + [f"nodes/{d['group']}/{metric}" for d in layers for metric in results.NODE_METRICS]
