"""Public path of the results API (documented as ``trajscope.results``); the format lives in
:mod:`trajscope.io.results`. Kept light: the TensorBoard plugin imports it without torch."""

from trajscope.io.results import LABELS, Results, open_results

__all__ = ["LABELS", "Results", "open_results"]
