"""A ResultsWriter in argv[1] killed after a flush (os._exit, no close()): the committed rows must
survive. Run by test_killed_process_leaves_committed_rows."""

import os
import sys

import numpy as np

from trajscope.io.resultswriter import ResultsWriter

w = ResultsWriter(sys.argv[1], {}, {"fc": 4})
for k in range(5):
    w.append(k, {"loss": float(k)}, {"fc": {"rho": np.full(4, k, np.float32)}})
w.flush()
w.append(5, {"loss": 5.0}, {"fc": {"rho": np.full(4, 5, np.float32)}})  # buffered, never flushed
os._exit(0)  # no close(): arrays keep their block capacity
