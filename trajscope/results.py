"""Public path of the results API (documented as ``trajscope.results``, with the names it had before
the layout moved): the format and reader live in :mod:`trajscope.io.results`, the writer in
:mod:`trajscope.io.resultswriter`. Kept light: the TensorBoard plugin imports it without torch."""

from trajscope.io.results import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GLOBAL,
    LABELS,
    NODE_FLOAT,
    NODE_INT,
    NODE_METRICS,
    NODE_U8,
    STORE_NAME,
    UNSET_INT,
    UNSET_U8,
    Results,
    discard_partial_stores,
    group_name,
    open_results,
    results_exist,
)
from trajscope.io.resultswriter import ResultsWriter

__all__ = [
    "LABELS",
    "NODE_FLOAT",
    "NODE_INT",
    "NODE_U8",
    "NODE_METRICS",
    "GLOBAL",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "STORE_NAME",
    "UNSET_U8",
    "UNSET_INT",
    "ResultsWriter",
    "Results",
    "open_results",
    "results_exist",
    "discard_partial_stores",
    "group_name",
]
