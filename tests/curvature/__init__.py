"""Tests of trajscope.curvature: per-node curvature blocks, sharpness, node layers."""
