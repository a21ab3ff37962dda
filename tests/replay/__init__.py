"""Tests of trajscope.replay: replaying recorded steps (train mode, fidelity, damaged steps)."""
