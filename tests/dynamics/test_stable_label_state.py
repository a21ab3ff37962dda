"""StableLabelState: the stable-label hysteresis carried across checkpoints (dynamics/labels.py)."""

from __future__ import annotations

import numpy as np
import torch

from trajscope.dynamics.labels import StableLabelState, stable_labels


def _reference(labels: list[np.ndarray], window: int) -> list[np.ndarray]:
    """stable_labels applied row by row with the whole history (the rule the state must follow)."""
    out, prev = [], None
    for i, lab in enumerate(labels):
        hist = torch.from_numpy(np.stack(labels[:i])) if i else None
        prev = stable_labels(hist, prev, torch.from_numpy(lab), window)
        out.append(prev.numpy())
    return out


def test_update_follows_stable_labels():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 2, size=5).astype(np.uint8) for _ in range(12)]
    for window in (1, 2, 3, 5):
        state = StableLabelState(["a"], window)
        got = [state.update("a", lab) for lab in labels]
        for g, r in zip(got, _reference(labels, window)):
            assert g.dtype == np.uint8 and np.array_equal(g, r)


def test_resume_continues_as_one_run():
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 3, size=4).astype(np.uint8) for _ in range(9)]
    whole = StableLabelState(["a"], 3)
    ref = [whole.update("a", lab) for lab in labels]
    first = StableLabelState(["a"], 3)
    done = [first.update("a", lab) for lab in labels[:5]]
    resumed = StableLabelState(["a"], 3)
    resumed.resume("a", np.stack(labels[:5]), done[-1])
    for lab, r in zip(labels[5:], ref[5:]):
        assert np.array_equal(resumed.update("a", lab), r)


def test_without_hysteresis_the_label_is_the_stable_label():
    state = StableLabelState(["a", "b"], 3)
    lab = np.array([255, 255], np.uint8)
    assert state.update("b", lab, hysteresis=False) is lab
    assert state.stable["a"] is None
