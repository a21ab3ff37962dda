"""A Recorder never closed (argv[1]: the run folder): atexit must close it. Run by
test_recorder_left_open_is_closed_by_atexit_without_zarr_threads."""

import sys
import threading

import torch

import trajscope.record.writer_thread as R
from tests.helpers.recording import make_batches, make_model, train
from trajscope.record.recorder import Recorder

R._COMMIT_INTERVAL = 5.0  # the last records surely wait for the timer when the script ends
model = make_model("tensor")
opt = torch.optim.SGD(model.parameters(), lr=0.1)
probe = (torch.arange(6.0).reshape(2, 3), {"flag": torch.tensor(True), "bf": torch.ones(2, dtype=torch.bfloat16)})
rec = Recorder(sys.argv[1], model, opt, torch.nn.MSELoss(), export=False, background=False, probe=probe)
train(model, opt, torch.nn.MSELoss(), make_batches("tensor", 5), rec=rec)
print("TIMER", rec._timer is not None)
print("THREADS", sorted(t.name for t in threading.enumerate()))
# no close(): atexit closes the recorder
