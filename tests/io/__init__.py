"""Tests of trajscope.io: the trajectory store, results, run lock and TensorBoard event files."""
