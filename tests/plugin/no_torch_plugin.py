"""The TensorBoard plugin imports without torch (run in a fresh interpreter by test_plugin_imports_no_torch)."""

import sys

import trajscope.results  # noqa: F401 (the imports are what is tested)
import trajscope_tensorboard.loader  # noqa: F401
import trajscope_tensorboard.plugin  # noqa: F401

assert "torch" not in sys.modules, "torch imported"
