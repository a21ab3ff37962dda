"""Compatibility: what this module held now lives in :mod:`trajscope.io.specs` (how a run names its
model and loss code), :mod:`trajscope.replay.functional` (calling a model) and
:mod:`trajscope.record.export` (the ``torch.export`` program)."""
from trajscope.io.specs import (build_loss, build_model, describe_loss, describe_node_layers, load_exported,  # noqa: F401
                                mode_sensitive, model_spec_of, parse_kwargs, resolve, unwrap_model)
from trajscope.record.export import export_model  # noqa: F401
from trajscope.replay.functional import call_model, functional_forward  # noqa: F401
