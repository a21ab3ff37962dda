"""Session-wide test options.

``TRAJSCOPE_TEST_DEVICE=cuda`` runs every analysis that a test starts through
``trajscope.analyze`` on that device, while the test's references (dense ``torch.func``
Hessians, real ``torch.optim`` steps) stay on the CPU: the GPU check of
``benchmarks/gpu_check.sh``. ``lazy`` (torch's lazy-tensor device, executed on the CPU) finds
tensors left on the wrong device without a GPU. Unset (CI), nothing changes.
"""

from __future__ import annotations

import os
import tempfile

import pytest

# The user's signing key (trajscope.trust) for this test session: never the tester's own key, and
# inherited by the example scripts the tests run in subprocesses.
os.environ["TRAJSCOPE_KEY_FILE"] = os.path.join(tempfile.mkdtemp(prefix="trajscope-key-"), "signing.key")

_DEVICE = os.environ.get("TRAJSCOPE_TEST_DEVICE")
if _DEVICE == "lazy":  # torch's TorchScript lazy-tensor device: a second device on a CPU-only machine
    import torch
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    torch.set_num_threads(1)  # lazy tensors are not thread-safe: no eigen pool


@pytest.fixture(autouse=True)
def _analysis_device(monkeypatch: pytest.MonkeyPatch) -> None:
    if _DEVICE:
        from trajscope.analysis import pipeline

        options = pipeline._options
        monkeypatch.setattr(pipeline, "_options", lambda **kw: options(**{"device": _DEVICE, **kw}))


@pytest.fixture
def other_user(tmp_path_factory: pytest.TempPathFactory):
    """A context manager under which runs are recorded with another user's signing key, so that
    they reach this user as runs received from elsewhere."""
    import contextlib

    @contextlib.contextmanager
    def switch():
        mine = os.environ["TRAJSCOPE_KEY_FILE"]
        os.environ["TRAJSCOPE_KEY_FILE"] = str(tmp_path_factory.mktemp("other-user") / "signing.key")
        try:
            yield
        finally:
            os.environ["TRAJSCOPE_KEY_FILE"] = mine

    return switch
