"""Analyse runs on torch's lazy-tensor device: argv[1] is a JSON list of (run folder, analyze
options). Run in a subprocess by the device tests (the lazy backend is process-global)."""

import json
import sys

import torch
import torch._lazy.ts_backend

torch._lazy.ts_backend.init()
torch.set_num_threads(1)  # lazy tensors are not thread-safe: no eigen pool
import trajscope

for run, opts in json.loads(sys.argv[1]):
    trajscope.analyze(run, device="lazy", progress=False, **opts)
