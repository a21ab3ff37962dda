"""Tests of the TensorBoard plugin (plugins/trajscope_tensorboard)."""
