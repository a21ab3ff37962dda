"""The long SIGKILL soak, by hand (pytest does not collect it; ``test_sigkill.py`` is its CI variant).

    .venv/bin/python tests/reliability/soak.py --kills 100            # 100 kills per writer mode
    .venv/bin/python tests/reliability/soak.py --kills 20 --modes inline --max-delay 3 --seed 7

Each kill trains the crash-test MLP under a Recorder in a forked child (both writer modes; within
a mode, kills alternate between ``every=1`` and ``every=5, window=2``), SIGKILLs it a random
0..--max-delay seconds after the Recorder was constructed, then checks the run against the
child's fsync'd log of SHA-256(θ_t): it opens, every committed step is bit-exact, no recorded step
older than the commit window is lost, ``trajscope.analyze`` works on the last committed
checkpoints, and ``Recorder(resume=True)`` continues it (see ``sigkill_rig.py``). Prints one line
per kill and a table per mode and cadence; exits 1 if any kill failed a check. About 4 s per kill.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100, help="kills per writer mode (default 100)")
    ap.add_argument("--modes", default="thread,inline", help="writer modes: thread (background=True), inline (False)")
    ap.add_argument("--max-delay", type=float, default=2.0, help="latest kill, seconds after the Recorder exists")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep the killed runs under this folder")
    args = ap.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not set(modes) <= {"thread", "inline"} or args.kills < 1:
        ap.error("--modes takes thread and/or inline; --kills at least 1")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")

    # never the tester's own signing key (trajscope.trust), inherited by the children
    os.environ["TRAJSCOPE_KEY_FILE"] = os.path.join(tempfile.mkdtemp(prefix="trajscope-soak-key-"), "signing.key")
    import torch

    torch.set_num_threads(1)  # the in-process reference must match the child bit for bit
    import sigkill_rig

    work = args.keep or Path(tempfile.mkdtemp(prefix="trajscope-soak-"))
    print(f"seed {seed}; {args.kills} kills per mode ({', '.join(modes)}); runs in {work}", flush=True)
    zygote = sigkill_rig.Zygote()
    ref = sigkill_rig.Reference()
    kills = []
    t0 = time.monotonic()
    try:
        for i, (mode, every, delay) in enumerate(sigkill_rig.plan(args.kills, modes, args.max_delay, seed)):
            folder = work / f"kill{i:04d}"
            k = sigkill_rig.kill_one(zygote, ref, folder, mode, every, delay)
            kills.append(k)
            print(
                f"{i:4d} {mode:6} every={every} kill after {delay:.3f} s: logged {k.logged}, committed "
                f"{k.committed}, uncommitted {k.uncommitted} (oldest {k.oldest_lost_age:.3f} s) "
                f"{'ok' if not k.problems else 'FAILED: ' + '; '.join(k.problems)}",
                flush=True,
            )
            if args.keep is None and not k.problems:
                import shutil

                shutil.rmtree(folder, ignore_errors=True)
    finally:
        zygote.close()
    print(
        f"\n{len(kills)} kills in {time.monotonic() - t0:.0f} s (seed {seed}); "
        f"loss window asserted: {sigkill_rig.LOSS_WINDOW} s"
    )
    print(sigkill_rig.summary(kills))
    return 1 if any(k.problems for k in kills) else 0


if __name__ == "__main__":
    sys.exit(main())
