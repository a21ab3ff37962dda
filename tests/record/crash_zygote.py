"""The crash-test zygote: warms up once, then forks one recording child per line read from stdin
(argv[1]: the repository root, put on sys.path). Run by the zygote fixture of test_crash."""

import os
import sys

sys.path.insert(0, sys.argv[1])
import torch

torch.set_num_threads(1)

import numpy  # noqa: F401 (warm-up: every import the children need is paid once, here)
import zarr  # noqa: F401

import trajscope
import trajscope.io.writer  # noqa: F401
import trajscope.record.recorder
from tests.helpers.recording import crash_model, crash_optimizer, crash_step
from tests.helpers.zygote import serve_forks


def child(run_dir, background, steps=5000):
    model = crash_model()
    opt = crash_optimizer(model)
    loss_fn = torch.nn.MSELoss()
    rec = trajscope.record.recorder.Recorder(run_dir, model, opt, loss_fn, every=1, export=False, background=background)
    for t in range(steps):
        crash_step(model, opt, loss_fn, t, rec)
    rec.close()


# Warm up once (lazy imports, zarr codec registry, first torch ops) so a forked child starts recording
# within milliseconds. The recorder's writer thread is joined by close(); zarr resets its IO thread
# in a forked child (os.register_at_fork).
import tempfile

with tempfile.TemporaryDirectory() as d:
    child(os.path.join(d, "warmup"), True, steps=3)
    child(os.path.join(d, "warmup2"), False, steps=3)


def _child_of(fields):
    run_dir, mode = fields
    return lambda: child(run_dir, mode == "thread")


serve_forks(_child_of)
