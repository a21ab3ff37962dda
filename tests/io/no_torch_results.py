"""trajscope.io.results imports without torch (run in a fresh interpreter by test_no_torch_import)."""

import sys

assert "torch" not in sys.modules, "torch imported"
