"""The ``trajscope`` command (``python -m trajscope``)."""

from trajscope.cli.main import main

__all__ = ["main"]
