"""How a run names its code (part of the run format): the model and the loss described for offline
replay, and rebuilt from that description. Recording writes these descriptions, replay reads them.

Model, in order of preference at replay time:
1. an override given to ``analyze``/``open_run`` (``--model package.module:factory`` + JSON kwargs);
2. the import spec recorded by the Recorder (``model_spec=``), e.g. ``"trajscope.zoo:mlp"``;
3. the ``torch.export`` program saved in the store (``extra/model.pt2``).
Code named inside a run (2, 3 and the recorded loss) is used only as :mod:`trajscope.trust` allows.

Loss: any callable ``loss_fn(model_output, targets)`` importable by spec — the loop's own reshaping
(``F.cross_entropy(logits.view(-1, V), y.view(-1))``) belongs inside it. A loss module (``torch.nn``'s
or the user's ``nn.Module`` class) is recorded as its class and the constructor arguments it keeps as
attributes of the same name; a module-level function as ``module:qualname``; a ``functools.partial``
of such a function with JSON keyword arguments as that function and its keywords. The loss a model
computes itself (``loss="model"``, Hugging Face) is trajscope's :class:`~trajscope.modelloss.ModelLoss`
and its arguments. Anything else (a lambda, a closure, a bound method) needs ``--loss`` at replay time.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from trajscope.errors import TrajscopeError


def resolve(spec: str) -> Any:
    """Import ``package.module:attr.path``. Callers decide first whether the spec may be imported
    (:mod:`trajscope.trust`): importing a module runs its code."""
    if not isinstance(spec, str) or ":" not in spec:
        raise TrajscopeError(f"import spec {spec!r} must look like 'package.module:factory'")
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise TrajscopeError(
            f"cannot import {mod_name!r} for spec {spec!r} ({e}); install it or fix the spec"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TrajscopeError(f"{mod_name!r} has no attribute {attr!r} (spec {spec!r})")
        obj = getattr(obj, part)
    return obj


def parse_kwargs(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise TrajscopeError(f"model/loss arguments must be a JSON object, got {text!r} ({e.msg})") from None
    if not isinstance(out, dict):
        raise TrajscopeError(f"model/loss arguments must be a JSON object, got {text!r}")
    return out


# --------------------------------------------------------------------------- loss
def describe_loss(loss_fn: Any) -> dict[str, Any] | None:
    """A JSON description of ``loss_fn`` that :func:`build_loss` turns back into a callable."""
    from trajscope.modelloss import ModelLoss

    if isinstance(loss_fn, ModelLoss):
        return loss_fn.describe()
    if isinstance(loss_fn, nn.Module):
        cls = type(loss_fn)
        kwargs: dict[str, Any] = {}
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name in ("self", "size_average", "reduce") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if hasattr(loss_fn, name):
                v = getattr(loss_fn, name)
                if isinstance(v, torch.Tensor):
                    v = v.tolist()
                if v is None or isinstance(v, (bool, int, float, str, list)):
                    kwargs[name] = v
        return {"class": f"{cls.__module__}:{cls.__qualname__}", "kwargs": kwargs}
    if isinstance(loss_fn, functools.partial):
        inner = describe_loss(loss_fn.func)
        if inner is None or "function" not in inner or loss_fn.args or not _jsonable(loss_fn.keywords):
            return None
        return {"function": inner["function"], "kwargs": dict(loss_fn.keywords)}
    mod, qual = getattr(loss_fn, "__module__", None), getattr(loss_fn, "__qualname__", None)
    if mod and qual and "<" not in qual:
        return {"function": f"{mod}:{qual}"}
    return None


def build_loss(
    desc: Mapping[str, Any] | None, override: str | None = None, override_kwargs: str | Mapping[str, Any] | None = None
) -> Callable:
    if override:
        obj = resolve(override)
        kwargs = parse_kwargs(override_kwargs)
        return _construct(obj, kwargs, override) if isinstance(obj, type) else obj
    if desc is None:
        raise TrajscopeError("the run does not say how its loss is computed: pass --loss package.module:LossClass")
    if "class" in desc:
        cls = resolve(desc["class"])
        kwargs = parse_kwargs(desc.get("kwargs") or {})
        if isinstance(kwargs.get("weight"), list):
            kwargs["weight"] = torch.tensor(kwargs["weight"])
        if isinstance(kwargs.get("pos_weight"), list):
            kwargs["pos_weight"] = torch.tensor(kwargs["pos_weight"])
        return _construct(cls, kwargs, desc["class"])
    fn = resolve(desc["function"])
    return functools.partial(fn, **desc["kwargs"]) if desc.get("kwargs") else fn


def _jsonable(obj: Any) -> bool:
    try:
        json.dumps(obj, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _construct(factory: Callable, kwargs: Mapping[str, Any], spec: str) -> Any:
    """``factory(**kwargs)``, with its complaint about the arguments as one line."""
    try:
        return factory(**kwargs)
    except Exception as e:  # user-chosen code: any exception is bad input here
        raise TrajscopeError(
            f"{spec!r} rejected its arguments {dict(kwargs)}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None


# --------------------------------------------------------------------------- model
#: wrapper class name -> attribute holding the wrapped module; the wrappers add a prefix to every
#: parameter name (``_orig_mod.``, ``module.``) that the replayed model does not have.
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "FullyShardedDataParallel": "module",
}


def unwrap_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module inside ``torch.compile`` / DDP / DataParallel / FSDP wrappers, and the wrappers' class
    names (outermost first). Its parameters are the same tensors, named as the bare model names them."""
    wrappers: list[str] = []
    while type(model).__name__ in _WRAPPERS and isinstance(
        getattr(model, _WRAPPERS[type(model).__name__], None), nn.Module
    ):
        wrappers.append(type(model).__name__)
        model = getattr(model, _WRAPPERS[type(model).__name__])
    return model, wrappers


def mode_sensitive(model: nn.Module) -> list[str]:
    """Names of the modules whose function depends on their train/eval flag (BatchNorm, dropout)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd

    return [n for n, m in model.named_modules() if isinstance(m, (_BatchNorm, _DropoutNd))]


def build_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    factory = resolve(spec)
    if not callable(factory):
        raise TrajscopeError(f"model factory {spec!r} is not callable: name a function or class that builds the model")
    model = _construct(factory, parse_kwargs(kwargs or {}), f"model factory {spec}")
    if not isinstance(model, nn.Module):
        raise TrajscopeError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_exported(path: str) -> nn.Module:
    """Load the exported program as a module tree whose submodules keep their qualified names."""
    from torch.export import load, unflatten

    ep = load(path)
    try:
        return unflatten(ep)
    except Exception:
        return ep.module()
