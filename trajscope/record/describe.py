"""The run's description in the store's root attributes: parameter names and layouts, the optimizer
and its hyperparameter columns, the model and loss as code specs, the signature over them; and the
check that a resumed run is the same model and optimizer."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

import trajscope
from trajscope import trust
from trajscope.errors import TrajscopeError
from trajscope.io import specs
from trajscope.io.packing import make_layout, numeric_hparams
from trajscope.nodes import find_node_layers
from trajscope.record.distributed import _distributed_meta

log = logging.getLogger("trajscope")


class RunDescription:
    """How the :class:`~trajscope.record.recorder.Recorder` describes its run."""

    # ------------------------------------------------------------------ description of the run
    def _describe_run(self, model_spec: str | None, model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        """The root attributes of this rank's store, and the layouts that snapshots of the run follow."""
        self._names = self._param_names()
        self._param_items = list(self.model.named_parameters())
        self._buffer_items = [(n, b) for n, b in self.model.named_buffers() if b is not None]
        self._param_layout = make_layout(self._param_items)
        self._buffer_layout = make_layout(self._buffer_items)
        self._hparam_names, self._hparam_bools = self._hparam_schema()
        self._n_groups = len(self.optimizer.param_groups)
        meta = self._meta(model_spec, model_kwargs)
        meta["signature"] = _signature(meta["model"], meta["loss"], None)
        if self.world_size > 1:
            meta = _distributed_meta(meta, self.rank, self.world_size)
        return meta

    def _param_names(self) -> dict[int, str]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        for g, group in enumerate(self.optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                names.setdefault(id(p), f"optimizer.group{g}.param{i}")
        return names

    def _hparam_schema(self) -> tuple[list[str], list[str]]:
        names: list[str] = []
        bools: list[str] = []
        for group in self.optimizer.param_groups:
            for k, v in numeric_hparams(group).items():
                if k not in names:
                    names.append(k)
            bools += [k for k, v in group.items() if isinstance(v, bool) and k not in bools]
        return names, bools

    def _meta(self, model_spec: str | None, model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        opt = self.optimizer
        groups = [
            {
                "params": [self._names[id(p)] for p in g["params"]],
                "static": {
                    k: v for k, v in g.items() if k != "params" and not isinstance(v, (int, float, bool, tuple, list))
                },
            }
            for g in opt.param_groups
        ]
        return {
            "trajscope_version": trajscope.__version__,
            "torch_version": torch.__version__,
            "cadence": {"every": self.every, "window": self.window},
            "params": [s.to_json() for s in self._param_layout],
            "trainable": [n for n, p in self._param_items if p.requires_grad],
            "buffers": [s.to_json() for s in self._buffer_layout],
            "optimizer": {
                "class": f"{type(opt).__module__}.{type(opt).__qualname__}",
                "name": type(opt).__name__,
                "groups": groups,
            },
            "hparam_names": self._hparam_names,
            "hparam_bools": self._hparam_bools,
            "model": {
                "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "spec": model_spec,
                "kwargs": dict(model_kwargs or {}),
                "exported": None,
                "export_error": None if self.export else "export not requested",
                "node_layers": describe_node_layers(self.model),
                "wrapped_by": self._wrappers,
                "mode_sensitive": specs.mode_sensitive(self.model),
            },
            "loss": specs.describe_loss(self.loss_fn) if self.loss_fn is not None else None,
        }

    def _check_resumable(self, attrs: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        stored = [tuple(s[:3]) for s in attrs["params"]]
        now = [tuple(s[:3]) for s in meta["params"]]
        if stored != now:
            diff = next((a for a, b in zip(now, stored) if a != b), None) or "parameter count"
            raise TrajscopeError(
                f"cannot resume {self.path}: the model's parameters differ from the recorded ones "
                f"(first difference: {diff}); record to a new folder"
            )
        # the hparams columns and groups are described once, in the root attributes
        was, now = attrs["optimizer"], meta["optimizer"]
        if (was["class"], len(was["groups"]), attrs["hparam_names"]) != (
            now["class"],
            len(now["groups"]),
            meta["hparam_names"],
        ):
            raise TrajscopeError(
                f"cannot resume {self.path}: the optimizer differs from the recorded one (recorded "
                f"{was['name']} with {len(was['groups'])} group(s) and hyperparameters "
                f"{attrs['hparam_names']}, now {now['name']} with {len(now['groups'])} and "
                f"{meta['hparam_names']}); record to a new folder"
            )


def _signature(model: Mapping[str, Any], loss: Any, exported_sha256: str | None) -> dict[str, Any] | None:
    """This user's signature over the run's description of its code (:mod:`trajscope.trust`): runs
    recorded here replay without ``--trust``. Best effort: an unsigned run only asks for a flag."""
    try:
        return trust.sign(model, loss, exported_sha256)
    except Exception as e:
        log.info("trajscope: the run is not signed (%s); analysing it will need --trust or --model", e)
        return None


def describe_node_layers(model: nn.Module) -> list[dict[str, Any]]:
    """The node-carrying modules of the live model, as JSON (an exported program has no module types)."""
    return [asdict(layer) for layer in find_node_layers(model)]


def model_spec_of(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """An import spec and arguments that rebuild ``model`` without the training script, where trajscope
    knows one: a ``transformers`` model, from its config. None otherwise."""
    if not type(model).__module__.startswith("transformers."):
        return None
    from trajscope.integrations import huggingface

    return huggingface.model_spec(model)
