"""Hold the analysis lock of the run folder argv[1] until killed (test_lock_is_released_when_its_holder_is_killed)."""

import sys
import time

from trajscope.io.runlock import analysis_lock

with analysis_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
