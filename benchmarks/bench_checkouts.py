"""Two checkouts of trajscope side by side: is one slower than the other? (script, not a test)

Made for refactors that must not change speed (#15). Each measurement runs in a fresh process
with ``PYTHONPATH`` set to one checkout, the checkouts interleaved round-robin so that load
drift hits them alike; medians of ``--repeats`` rounds. Only the public API is used, so any two
versions compare:

* ``import``: ``python -c "import trajscope.cli"`` (the CLI's fixed cost above Python);
* ``analyze``: ``python -m trajscope analyze`` of copies of the shipped sample runs (every
  checkpoint, node spectra, labels, sharpness, results and events written);
* ``record``: 300 steps of SGD on the 784-512-512-10 MLP, batch 128, with a
  ``trajscope.Recorder`` at every=10, and the same loop with no recording.

    python benchmarks/bench_checkouts.py BEFORE_CHECKOUT AFTER_CHECKOUT [--repeats 3]

Each checkout needs its C kernel built in place (``trajscope/**/_smalleig*.so``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"

RECORD_LOOP = r"""
import sys, time, torch, trajscope
from trajscope.zoo import mlp
sizes, steps = [784, 512, 512, 10], 300
g = torch.Generator().manual_seed(0)
data = [(torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(20)]
torch.manual_seed(0)
model = mlp(sizes)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
loss_fn = torch.nn.CrossEntropyLoss()
out, kind = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if kind == "none":
    for t in range(steps):
        x, y = data[t % 20]
        loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
else:
    with trajscope.Recorder(out, model, opt, loss_fn, every=10, model_spec="trajscope.zoo:mlp",
                            model_kwargs={"sizes": sizes}) as rec:
        for t in range(steps):
            x, y = data[t % 20]
            loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); rec.batch(x, y); opt.step()
print(time.perf_counter() - t0)
"""


def _env(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout)}


def _wall(cmd: list[str], checkout: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=_env(checkout), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(checkout: Path, work: Path) -> dict[str, float]:
    """One round of every measurement for one checkout (seconds)."""
    py = sys.executable
    out = {"import": _wall([py, "-c", "import trajscope.cli"], checkout)}
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.copytree(SAMPLES, runs, ignore=shutil.ignore_patterns("analysis.zarr", "events.out.tfevents.*"))
    out["analyze"] = _wall([py, "-m", "trajscope", "analyze", str(runs), "--no-progress"], checkout)
    for kind in ("none", "recorder"):
        shutil.rmtree(work / "rec", ignore_errors=True)
        res = subprocess.run(
            [py, "-c", RECORD_LOOP, str(work / "rec"), kind],
            env=_env(checkout),
            check=True,
            capture_output=True,
            text=True,
        )
        out[f"record:{kind}"] = float(res.stdout.split()[-1])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="trajscope-checkouts-"))
    rows: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for r in range(args.repeats):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            for key, sec in measure(getattr(args, name).resolve(), work).items():
                rows[name].setdefault(key, []).append(sec)
    print(f"medians of {args.repeats} interleaved rounds (seconds)")
    print(f"{'measure':<18}{'before':>10}{'after':>10}{'after/before':>14}")
    for key in rows["before"]:
        b, a = statistics.median(rows["before"][key]), statistics.median(rows["after"][key])
        print(f"{key:<18}{b:>10.3f}{a:>10.3f}{a / b:>14.3f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
