"""Where the analysis time goes: cProfile of ``trajscope.analyze`` on one recorded MLP.

    python benchmarks/profile_analysis.py [--device cuda] [--sizes 3072 2048 2048 2048 10]

Records bench_cost's run (batch 128, SGD with momentum, 12 steps), analyses 2 checkpoints to warm
up (CUDA context, handles, the eigen pool), then profiles 6 more and prints the functions with
the most cumulative time (GPU work shows up where the host waits for it).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trajscope

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cost import record  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[3072, 2048, 2048, 2048, 10])
    ap.add_argument("--no-sharpness", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        record(run, args.sizes)
        kw = dict(device=args.device, sharpness=not args.no_sharpness, progress=False)
        trajscope.analyze(run, steps=(0, 2), **kw)
        shutil.rmtree(run / "analysis.zarr")
        for f in run.glob("events.out.tfevents.*"):
            f.unlink()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        res = trajscope.analyze(run, steps=(2, 8), **kw)[run]
        prof.disable()
        dt = time.perf_counter() - t0
    print(f"{'-'.join(map(str, args.sizes))} on {args.device}: {dt / len(res.steps):.3f} s per checkpoint")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
