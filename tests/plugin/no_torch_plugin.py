"""The TensorBoard plugin imports without torch (run in a fresh interpreter by test_plugin_imports_no_torch)."""

import sys

assert "torch" not in sys.modules, "torch imported"
