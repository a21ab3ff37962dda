"""What trajscope costs per model size: storage per recorded step and analysis time per checkpoint.

    .venv/bin/python benchmarks/bench_cost.py

MLPs of growing width on synthetic data, SGD with momentum, batch 128, every step recorded for
12 steps; then `trajscope.analyze` (GGN, float32) with and without the Lanczos sharpness. Prints
one table (the README's "What it costs").
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

import trajscope
from trajscope import zoo
from trajscope.io.reader import TrajectoryReader

SIZES = [[64, 32, 16, 10], [784, 128, 10], [784, 512, 512, 10], [784, 1024, 1024, 1024, 10]]
STEPS, BATCH = 12, 128


def record(run: Path, sizes: list[int]) -> tuple[int, float]:
    torch.manual_seed(0)
    model = zoo.mlp(sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(STEPS, BATCH, sizes[0]), torch.randint(0, sizes[-1], (STEPS, BATCH))
    with trajscope.Recorder(
        run,
        model,
        opt,
        loss_fn,
        export=False,
        overwrite=True,
        model_spec="trajscope.zoo:mlp",
        model_kwargs={"sizes": sizes},
    ) as rec:
        for t in range(STEPS):
            loss = loss_fn(model(x[t]), y[t])
            opt.zero_grad()
            loss.backward()
            rec.batch(x[t], y[t])
            opt.step()
    n_params = sum(p.numel() for p in model.parameters())
    return n_params, TrajectoryReader(run).disk_bytes() / STEPS


def analyse(run: Path, **options) -> float:
    shutil.rmtree(run / "analysis.zarr", ignore_errors=True)
    for f in run.glob("events.out.tfevents.*"):
        f.unlink()
    t0 = time.perf_counter()
    res = trajscope.analyze(run, **options)[run]
    return (time.perf_counter() - t0) / len(res.steps)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sizes in SIZES:
            run = Path(tmp) / "x".join(map(str, sizes))
            n, per_step = record(run, sizes)
            nodes = sum(sizes[1:])
            t_full = analyse(run)
            t_fast = analyse(run, sharpness=False)
            rows.append((sizes, n, nodes, per_step, t_fast, t_full))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {BATCH}, SGD+momentum, float32, GGN")
    print(f"{'model (MLP)':28} {'params':>10} {'nodes':>6} {'disk/step':>10} {'analysis/ckpt':>14} {'+sharpness':>11}")
    for sizes, n, nodes, per_step, t_fast, t_full in rows:
        print(
            f"{'-'.join(map(str, sizes)):28} {n:>10,} {nodes:>6} {per_step / 2**20:>8.2f} MiB {t_fast:>12.2f} s {t_full:>9.2f} s"
        )


if __name__ == "__main__":
    main()
