"""Tests of trajscope.analysis: the pipeline end to end, devices, the label-validity benchmark."""
