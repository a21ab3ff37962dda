"""Checks of the bare C kernel in a fresh interpreter (numpy and the extension only, no torch), so
that a crash or hang of the kernel is a return code or timeout of this process: argv[1] is the
extension's file, argv[2] the check. Run by test_eigen's _run_isolated."""

import importlib.util
import json
import sys
import time

import numpy as np

spec = importlib.util.spec_from_file_location("_smalleig", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)


def nonfinite_lanes():
    rng = np.random.default_rng(0)
    n = 9
    B = rng.standard_normal((16, n, n)).astype(np.float32)
    B = (B + B.transpose(0, 2, 1)) / 2
    good = np.empty((16, n), np.float32)
    mod.eigvalsh(B, good, 16, n)
    worst, slowest = 0.0, 0.0
    for val in (np.nan, np.inf, -np.inf):
        for pos in ((0, 0), (n - 1, 0), (n - 1, n - 1), (4, 3)):
            for lanes in ((2,), (0, 15), tuple(range(1, 16, 2))):
                G = B.copy()
                for t in lanes:
                    G[t, pos[0], pos[1]] = val
                    G[t, pos[1], pos[0]] = val
                out = np.empty((16, n), np.float32)
                t0 = time.perf_counter()
                mod.eigvalsh(G, out, 16, n)
                slowest = max(slowest, time.perf_counter() - t0)
                ok = [t for t in range(16) if t not in lanes]
                worst = max(worst, float(np.abs(out[ok] - good[ok]).max()))
    G = np.full((16, n, n), np.nan, np.float32)
    G[5] = B[5]
    out = np.empty((16, n), np.float32)
    mod.eigvalsh(G, out, 16, n)
    worst = max(worst, float(np.abs(out[5] - good[5]).max()))
    print(json.dumps({"worst": worst, "slowest": slowest}))


def overflowing_batch():
    src = np.zeros(0, np.float32)
    dst = np.zeros(0, np.float32)
    try:
        mod.eigvalsh(src, dst, 2**62, 1)
    except ValueError:
        print("ValueError")


{"nonfinite_lanes": nonfinite_lanes, "overflowing_batch": overflowing_batch}[sys.argv[2]]()
