"""Tests of trajscope.record: the Recorder in training loops, crashes, DDP and wrapped models."""
