"""Fixtures of the plugin tests."""

from __future__ import annotations

import pytest

from tests.helpers.plugin import real_logdir, tensorboard_server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A TensorBoard server (one per test module) over the logdir of a small real run: (logdir, base URL)."""
    logdir = real_logdir(tmp_path_factory)
    with tensorboard_server(logdir) as base:
        yield logdir, base
