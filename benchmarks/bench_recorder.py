"""Recorder overhead vs. no recording and vs. a naive ``torch.save`` recorder.

Reference loop: MLP 784-512-512-10 (``trajscope.zoo.mlp``), batch 128, synthetic data, SGD,
500 steps, CPU. Side by side in one process, configurations interleaved round-robin so that load
drift hits them alike; medians of ``--repeats`` runs:

* no recording;
* ``trajscope.Recorder`` (defaults: export on, model spec given) at every = 1, 10, 100 (window 2;
  every=1 records every step);
* naive: ``torch.save(model.state_dict(), f"{dir}/step{t}.pt")`` on the same steps;
* the Recorder at every=100 with ``export=True`` too (by default it exports only without a model spec);
* the Recorder with ``background=True`` at every cadence (the default places the writer on the
  training thread when torch's threads already use every core, as on a 2-core machine).

Wall time covers the whole loop including the recorder's construction and ``close()`` (every queued
record is on disk when the clock stops). Between runs, outside the clock, the previous run's files
are deleted and ``os.sync()`` flushes them, so that no run pays for another one's writeback. Bytes on disk per recorded step are compared with the raw
parameter bytes; the recorder also stores the mini-batch (inputs + targets) of each recorded step,
shown separately.

    python benchmarks/bench_recorder.py [--steps 500] [--repeats 3] [--dir /tmp/bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import trajscope
from trajscope.zoo import mlp

SIZES = [784, 512, 512, 10]
BATCH = 128
CADENCES = (1, 10, 100)
WINDOW = 2


def make_data(n_batches: int = 20) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (BATCH,), generator=g))
        for _ in range(n_batches)
    ]


def records(t: int, every: int) -> bool:
    return t % every < (1 if every == 1 else WINDOW)


def run_once(
    kind: str, every: int, steps: int, data, out: Path, export: bool | None = None, background: bool | None = None
) -> dict:
    """One training run; returns wall seconds, recorded steps and bytes on disk."""
    torch.manual_seed(0)
    model = mlp(SIZES)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    os.sync()
    time.sleep(0.2)
    n_rec = 0
    t0 = time.perf_counter()
    if kind == "none":
        for t in range(steps):
            x, y = data[t % len(data)]
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    elif kind == "naive":
        for t in range(steps):
            x, y = data[t % len(data)]
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            if records(t, every):
                torch.save(model.state_dict(), f"{out}/step{t}.pt")
                n_rec += 1
            opt.step()
    else:
        with trajscope.Recorder(
            out,
            model,
            opt,
            loss_fn,
            every=every,
            window=None if every == 1 else WINDOW,
            model_spec="trajscope.zoo:mlp",
            model_kwargs={"sizes": SIZES},
            export=export,
            background=background,
        ) as rec:
            for t in range(steps):
                x, y = data[t % len(data)]
                loss = loss_fn(model(x), y)
                opt.zero_grad()
                loss.backward()
                rec.batch(x, y)
                opt.step()
        assert rec.failed is None, rec.failed
        n_rec = rec.n_recorded
    wall = time.perf_counter() - t0
    files = [f for f in out.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    param_bytes = sum(f.stat().st_size for f in files if "params" in f.parts)
    batch_bytes = sum(f.stat().st_size for f in files if "batch" in f.parts)
    return {"wall": wall, "n": n_rec, "bytes": total, "param_bytes": param_bytes, "batch_bytes": batch_bytes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where runs are written (default: a temporary folder on disk)")
    ap.add_argument(
        "--cadences", type=int, nargs="+", default=list(CADENCES), help="cadences to run (default 1 10 100)"
    )
    args = ap.parse_args(argv)

    base = Path(args.dir or tempfile.mkdtemp(prefix="trajscope-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    data = make_data()
    raw = sum(p.numel() * p.element_size() for p in mlp(SIZES).parameters())
    batch_raw = data[0][0].numel() * 4 + data[0][1].numel() * 8

    # One-off costs of a fresh process, paid by the first Recorder (imports, zarr set-up) and by the
    # first export (torch.export imports). Measured here, then excluded from the timed runs.
    t0 = time.perf_counter()
    run_once("recorder", 100, 2, data, base / "warmup")
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_once("recorder", 100, 2, data, base / "warmup", export=True)
    warm_export = time.perf_counter() - t0
    run_once("none", 1, 20, data, base / "warmup")

    cadences = args.cadences
    configs = (
        [("none", 1)]
        + [("recorder", e) for e in cadences]
        + [("recorder+export", 100)] * (100 in cadences)
        + [("recorder+thread", e) for e in cadences]
        + [("naive", e) for e in cadences]
    )
    results: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for kind, every in configs:
            results[(kind, every)].append(
                run_once(
                    kind.split("+")[0],
                    every,
                    args.steps,
                    data,
                    base / "run",
                    export=True if kind.endswith("+export") else None,
                    background=True if kind.endswith("+thread") else None,
                )
            )
    shutil.rmtree(base, ignore_errors=True)

    base_wall = statistics.median(x["wall"] for x in results[("none", 1)])
    load = os.getloadavg()
    print(
        f"\ntrajscope Recorder benchmark: MLP {'-'.join(map(str, SIZES))}, batch {BATCH}, SGD, {args.steps} steps, "
        f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores), medians of {args.repeats} runs"
    )
    print(
        f"raw parameter bytes: {raw / 2**20:.2f} MiB; raw batch bytes (inputs + targets): {batch_raw / 2**10:.0f} KiB; "
        f"load average (1/5/15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"one-off costs in a fresh process, excluded by warm-up runs: first Recorder {warm:.2f} s, "
        f"first torch.export {warm_export:.2f} s"
    )
    placement = (
        "background thread" if trajscope.record.recorder._free_core_for_writer(mlp(SIZES)) else "training thread"
    )
    print(f"the Recorder's default writer here: {placement}; 'thread' rows force the background thread\n")
    head = (
        f"{'configuration':<30}{'recorded':>9}{'wall s':>9}{'min..max s':>14}{'vs none':>9}{'vs naive':>10}"
        f"{'paired':>8}{'MiB/rec step':>14}{'params/raw':>12}{'batch KiB':>11}"
    )
    print(head)
    print("-" * len(head))
    for kind, every in configs:
        rs = results[(kind, every)]
        wall = statistics.median(x["wall"] for x in rs)
        lo, hi = min(x["wall"] for x in rs), max(x["wall"] for x in rs)
        n = rs[0]["n"]
        name = {
            "none": "no recording",
            "recorder": f"Recorder every={every}",
            "naive": f"naive torch.save every={every}",
            "recorder+export": f"Recorder every={every} +export",
            "recorder+thread": f"Recorder every={every} thread",
        }[kind]
        vs_naive = paired = ""
        if kind.startswith("recorder"):
            naive = statistics.median(x["wall"] for x in results[("naive", every)])
            vs_naive = f"{wall / naive:.3f}"
            # the same round's runs share the machine's state: their ratio drifts less than the walls
            paired = f"{statistics.median(a['wall'] / b['wall'] for a, b in zip(rs, results[('naive', every)])):.3f}"
        per = f"{rs[0]['bytes'] / n / 2**20:.2f}" if n else "-"
        pr = f"{(rs[0]['param_bytes'] if kind != 'naive' else rs[0]['bytes']) / n / raw:.3f}" if n else "-"
        bb = f"{rs[0]['batch_bytes'] / n / 2**10:.0f}" if n and kind != "naive" else "-"
        print(
            f"{name:<30}{n:>9}{wall:>9.2f}{f'{lo:.2f}..{hi:.2f}':>14}{wall / base_wall:>9.3f}{vs_naive:>10}{paired:>8}"
            f"{per:>14}{pr:>12}{bb:>11}"
        )
    print(
        "\nvs none: wall time / no-recording wall time (target: Recorder every=100 <= 1.05);"
        " vs naive: Recorder / naive torch.save at the same cadence (target <= 1);"
        " paired: median over rounds of that ratio within a round.\n"
        "MiB/rec step: everything on disk / recorded steps (the Recorder's includes the batch and metadata);"
        " params/raw: parameter bytes on disk per recorded step / raw parameter bytes."
    )


if __name__ == "__main__":
    main()
