"""Random SIGKILLs of a recording process, both writer modes (the fast CI variant of ``soak.py``).

Six kills: the background writer thread and the training-thread writer, each with ``every=1`` and
``every=5, window=2``, killed 0-1 s after the Recorder was constructed. What each kill is checked
for is in ``sigkill_rig.py``; ``python tests/reliability/soak.py --kills 100`` runs the long soak.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.reliability import sigkill_rig

KILLS_PER_MODE = 3
MAX_DELAY = 1.0


@pytest.fixture(scope="module")
def zygote():
    z = sigkill_rig.Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def reference():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the child's trajectory, bit for bit
    yield sigkill_rig.Reference()
    torch.set_num_threads(before)


def test_sigkill_leaves_a_run_that_opens_bit_exact_analyses_and_resumes(tmp_path, zygote, reference):
    seed = int.from_bytes(os.urandom(4), "little")
    kills = []
    for i, (mode, every, delay) in enumerate(sigkill_rig.plan(KILLS_PER_MODE, ("thread", "inline"), MAX_DELAY, seed)):
        k = sigkill_rig.kill_one(zygote, reference, tmp_path / f"kill{i}", mode, every, delay)
        assert not k.problems, (
            f"seed {seed}, kill {i} ({mode} writer, every={every}, after {delay:.3f} s): {k.problems}"
        )
        kills.append(k)
    print(f"seed {seed}\n{sigkill_rig.summary(kills)}")
    # the kills landed mid-stream, with records committed (not only right after construction)
    assert sum(k.committed > 0 for k in kills) >= len(kills) // 2, sigkill_rig.summary(kills)
