"""`make demo`: analyse the shipped sample runs into demo_runs/ (git-ignored) and say how to view them.

The tracked sample_data/ stays unchanged: the runs are copied first, then analysed in place.
"""

import shutil
import sys
import time
from pathlib import Path

from trajscope.cli import main as trajscope_main

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_data"
OUT = ROOT / "demo_runs"


def main() -> int:
    runs = sorted(p.parent.parent for p in SAMPLES.glob("*/trajectory.zarr/zarr.json"))
    if not runs:
        print(f"no sample runs in {SAMPLES}: regenerate them with python examples/make_sample_data.py", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    for run in runs:
        shutil.copytree(run, OUT / run.name)
    rc = trajscope_main(["analyze", str(OUT)])
    print(f"make demo took {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
