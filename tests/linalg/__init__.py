"""Tests of trajscope.linalg: the batched small-matrix eigensolver."""
