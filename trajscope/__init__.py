"""trajscope: record a PyTorch training trajectory, replay it, and analyse it neuron by neuron.

Public API: :class:`Recorder`, :func:`open_run`, :func:`analyze`.
Imports are lazy so that light consumers (the TensorBoard plugin reads
``trajscope.io.results``) never pay for importing torch.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Recorder", "open_run", "analyze", "TrajscopeError", "__version__"]


def __getattr__(name: str):
    if name == "Recorder":
        from trajscope.record.recorder import Recorder

        return Recorder
    if name == "open_run":
        from trajscope.replay.run import open_run

        return open_run
    if name == "analyze":
        from trajscope.analysis.pipeline import analyze

        return analyze
    if name == "TrajscopeError":
        from trajscope.errors import TrajscopeError

        return TrajscopeError
    raise AttributeError(f"module 'trajscope' has no attribute {name!r}")
