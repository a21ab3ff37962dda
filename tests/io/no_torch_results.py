"""trajscope.results (the public path) and trajscope.io.results import without torch (run in a fresh
interpreter by test_no_torch_import)."""

import sys

import trajscope.io.results  # noqa: F401 (the imports are what is tested)
import trajscope.results  # noqa: F401

assert "torch" not in sys.modules, "torch imported"
