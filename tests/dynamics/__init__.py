"""Tests of trajscope.dynamics: update maps, kinematics, motion and labels."""
