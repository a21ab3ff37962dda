"""Record to argv[1] as whoever runs this (test_permission_denied_as_an_unprivileged_user runs it as
user nobody): prints the one-line error and its cause."""

import sys

import torch

import trajscope
from trajscope.record.recorder import Recorder

model = torch.nn.Linear(3, 2)
try:
    Recorder(sys.argv[1], model, torch.optim.SGD(model.parameters(), lr=0.1), export=False)
except trajscope.TrajscopeError as e:
    print("error:", e, "| cause:", type(e.__cause__).__name__, e.__cause__.errno)
