"""Formats on disk: the trajectory store a Recorder writes, the results store and TensorBoard events an analysis writes, the run lock."""
