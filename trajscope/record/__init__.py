"""Recording a training loop into a run folder."""
