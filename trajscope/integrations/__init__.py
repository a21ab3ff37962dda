"""Callbacks that add a :class:`trajscope.Recorder` to training frameworks in one line.

Each submodule imports its framework only when imported itself, so ``import trajscope`` stays
light: ``trajscope.integrations.lightning`` (``pip install trajscope[lightning]``) and
``trajscope.integrations.huggingface`` (``pip install trajscope[huggingface]``).
"""
