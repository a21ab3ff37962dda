"""Resume the run argv[1] at step 66 (argv[2]: this folder, put on sys.path) and print the threads alive at the end. Run by test_restart_reads_records_without_zarr_threads."""

import sys
import threading

sys.path.insert(0, sys.argv[2])
from tests.io.test_store_shards import LOSS, batches, train, trainer_before
from trajscope.record.recorder import Recorder

data = batches(70)
model, opt = trainer_before(data, 66)
with Recorder(sys.argv[1], model, opt, LOSS, export=False, background=False, resume=True, step=66) as rec:
    train(model, opt, LOSS, data[66:], rec=rec)
print(sorted(t.name for t in threading.enumerate()))
