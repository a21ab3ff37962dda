"""Public path of the results API (documented as ``trajscope.results``, with the names it had before
the layout moved): the format and reader live in :mod:`trajscope.io.results`, the writer in
:mod:`trajscope.io.resultswriter`. Kept light: the TensorBoard plugin imports it without torch."""

from trajscope.io import results as _format
from trajscope.io.results import *  # noqa: F403 (the public names are the format module's)
from trajscope.io.resultswriter import ResultsWriter

__all__ = [*_format.__all__, "ResultsWriter"]
