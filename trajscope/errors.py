"""The one exception type for bad input: the CLI prints its message as one line and exits non-zero."""


class TrajscopeError(Exception):
    """Bad input (not a run, wrong format version, missing chunk, mismatched model, ...).

    The message is one line naming what is wrong and what to do.
    """
