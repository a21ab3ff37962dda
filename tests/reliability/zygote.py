"""The SIGKILL rig's zygote (sigkill_rig.Zygote): warms up, then forks one child per stdin line
(argv[1:3]: the repository root and this folder, put on sys.path)."""

import os
import sys

sys.path[:0] = sys.argv[1:3]
import torch

torch.set_num_threads(1)
import tempfile

import numpy  # noqa: F401 (warm-up: every import the children need is paid once, here)
import zarr  # noqa: F401

import trajscope  # noqa: F401
import trajscope.io.writer  # noqa: F401
import trajscope.record.recorder  # noqa: F401
from tests.helpers.zygote import serve_forks
from tests.reliability import sigkill_rig

with tempfile.TemporaryDirectory() as d:  # warm up: lazy imports, first torch ops, both writers
    for i, bg in enumerate((True, False)):
        sigkill_rig.child(os.path.join(d, f"w{i}"), os.path.join(d, f"w{i}.log"), bg, 1, 1, steps=3)


def _child_of(fields):
    run_dir, log_path, mode, every, window = fields
    return lambda: sigkill_rig.child(run_dir, log_path, mode == "thread", int(every), int(window))


serve_forks(_child_of)
