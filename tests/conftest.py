"""Session-wide test options.

``TRAJSCOPE_TEST_DEVICE=cuda`` runs every analysis that a test starts through
``trajscope.analyze`` on that device, while the test's references (dense ``torch.func``
Hessians, real ``torch.optim`` steps) stay on the CPU: the GPU check of
``benchmarks/gpu_check.sh``. Unset (CI), nothing changes.
"""
from __future__ import annotations

import os

import pytest

_DEVICE = os.environ.get("TRAJSCOPE_TEST_DEVICE")


@pytest.fixture(autouse=True)
def _analysis_device(monkeypatch: pytest.MonkeyPatch) -> None:
    if _DEVICE:
        from trajscope.analysis import pipeline

        options = pipeline._options
        monkeypatch.setattr(pipeline, "_options", lambda **kw: options(**{"device": _DEVICE, **kw}))
