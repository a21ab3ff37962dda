"""The TensorBoard plugin imports without torch (run in a fresh interpreter by test_plugin_imports_no_torch)."""
import sys, trajscope_tensorboard.loader, trajscope_tensorboard.plugin, trajscope.io.results
assert 'torch' not in sys.modules, 'torch imported'
