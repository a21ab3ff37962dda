"""Which modules carry nodes, and the parameter vector of each node (SPEC §3).

A *node* is the parameter block of one output unit:

* ``nn.Linear``: :math:`\\theta_i = [W_{i,:};\\ b_i] \\in \\mathbb{R}^{p}`, ``p = fan_in + 1``;
* ``nn.Conv{1,2,3}d``: :math:`\\theta_i = [\\mathrm{vec}(W_{i,\\dots});\\ b_i]` (its whole filter,
  flattened in C order: input channel of its group major, then kernel offsets), ``p = C_in/groups
  \\cdot \\prod k + 1``.

The ``+1`` is dropped when the module has no bias. Parameters of other modules (norms, embeddings,
transposed convolutions, ...) are not nodes; they enter only the global quantities (SPEC §8).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["NodeLayer", "find_node_layers", "node_matrix"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class NodeLayer:
    """One module whose output units are nodes.

    Attributes:
        name: module qualified name (``model.get_submodule(name)``), e.g. ``"net.0"``.
        kind: ``"linear"`` or ``"conv"``.
        weight: parameter name of the weight, e.g. ``"net.0.weight"``.
        bias: parameter name of the bias, or ``None``.
        n_nodes: ``out_features`` / ``out_channels`` (N).
        node_dim: ``p = weight[0].numel() + (bias is not None)``.
        conv: for convolutions, ``{"dims", "kernel_size", "stride", "padding", "dilation",
            "groups", "padding_mode", "pad"}``: tuples of ints per spatial dimension;
            ``padding`` is the padding before each spatial dimension and ``pad`` the explicit
            ``((before, after), ...)`` pair per dimension (they differ only for an even kernel
            under ``padding="same"``, which PyTorch pads one more on the right);
            ``padding_mode`` is the module's (``"zeros"``, ``"reflect"``, ...). ``None`` for Linear.
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    n_nodes: int
    node_dim: int
    conv: dict | None = None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None


def _conv_geometry(mod: nn.Module) -> dict:
    dims = len(mod.kernel_size)
    k = tuple(int(v) for v in mod.kernel_size)
    stride = tuple(int(v) for v in mod.stride)
    dil = tuple(int(v) for v in mod.dilation)
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            pad = tuple((0, 0) for _ in range(dims))
        elif mod.padding == "same":
            if any(s != 1 for s in stride):  # PyTorch itself forbids this combination
                raise ValueError(f"conv padding='same' with stride {stride} cannot be resolved")
            # Same rule as ATen's _convolution_same: total d*(k-1), the odd one on the right.
            pad = tuple((d * (kk - 1) // 2, d * (kk - 1) - d * (kk - 1) // 2) for d, kk in zip(dil, k))
        else:
            raise ValueError(f"conv padding={mod.padding!r} is not understood")
    else:
        pad = tuple((int(v), int(v)) for v in mod.padding)
    return {
        "dims": dims,
        "kernel_size": k,
        "stride": stride,
        "padding": tuple(lo for lo, _ in pad),
        "dilation": dil,
        "groups": int(mod.groups),
        "padding_mode": str(getattr(mod, "padding_mode", "zeros")),
        "pad": pad,
    }


def _geometry_from_call(dims: int, k: tuple[int, ...], args: Sequence, pad_op) -> dict | None:
    """Conv geometry from the arguments of an ``aten.conv{1,2,3}d`` / ``aten.convolution`` call,
    optionally preceded by an ``aten.pad`` of the module input."""
    def tup(v, default):
        if v is None:
            v = default
        if isinstance(v, int):
            v = [v]
        v = [int(a) for a in v]
        return tuple(v * dims if len(v) == 1 else v)

    stride = tup(args[3] if len(args) > 3 else None, 1)
    padding = args[4] if len(args) > 4 else 0
    dil = tup(args[5] if len(args) > 5 else None, 1)
    groups = int(args[6]) if len(args) > 6 else 1
    if isinstance(padding, str):
        if padding == "valid":
            pad = tuple((0, 0) for _ in range(dims))
        elif padding == "same" and all(s == 1 for s in stride):
            pad = tuple((d * (kk - 1) // 2, d * (kk - 1) - d * (kk - 1) // 2) for d, kk in zip(dil, k))
        else:
            return None
    else:
        pad = tuple((v, v) for v in tup(padding, 0))
    mode = "zeros"
    if pad_op is not None:
        flat = [int(v) for v in pad_op[0]]
        pmode = pad_op[1] if len(pad_op) > 1 and pad_op[1] is not None else "constant"
        value = pad_op[2] if len(pad_op) > 2 and pad_op[2] is not None else 0.0
        if len(flat) != 2 * dims or (pmode == "constant" and value != 0):
            return None
        extra = [(flat[2 * (dims - 1 - d)], flat[2 * (dims - 1 - d) + 1]) for d in range(dims)]
        if pmode == "constant":
            pad = tuple((a + c, b + e) for (a, b), (c, e) in zip(pad, extra))
        elif any(v for pr in pad for v in pr):
            return None
        else:
            pad, mode = tuple(extra), pmode
    return {"dims": dims, "kernel_size": k, "stride": stride,
            "padding": tuple(lo for lo, _ in pad), "dilation": dil, "groups": groups,
            "padding_mode": mode, "pad": pad}


def _exported_layer(mod: nn.Module) -> tuple[str, dict | None] | None:
    """``("linear", None)`` / ``("conv", geometry)`` for a submodule of an unflattened
    ``torch.export`` program whose graph is one linear/convolution of its input with its own
    ``weight`` (and ``bias``), optionally after an ``aten.pad``; ``None`` otherwise."""
    graph = getattr(mod, "graph", None)
    if graph is None or not hasattr(graph, "nodes"):
        return None
    calls = [n for n in graph.nodes if n.op == "call_function"]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not calls or len(calls) > 2 or len(placeholders) != 1:
        return None
    pad_op = None
    if len(calls) == 2:
        if "aten.pad" not in str(calls[0].target) or calls[0].args[0] is not placeholders[0]:
            return None
        pad_op, src = calls[0].args[1:], calls[0]
    else:
        src = placeholders[0]
    call = calls[-1]
    target = str(call.target)
    args = list(call.args)
    if len(args) < 2 or args[0] is not src or getattr(args[1], "op", None) != "get_attr" \
            or args[1].target != "weight":
        return None
    if target.startswith("aten.linear"):
        return ("linear", None) if pad_op is None else None
    w = getattr(mod, "weight", None)
    if not isinstance(w, Tensor) or w.dim() < 3:
        return None
    dims = w.dim() - 2
    k = tuple(int(v) for v in w.shape[2:])
    if target.startswith(f"aten.conv{dims}d"):
        geo = _geometry_from_call(dims, k, args, pad_op)
    elif target.startswith("aten.convolution"):
        if len(args) < 9 or args[6]:  # transposed
            return None
        geo = _geometry_from_call(dims, k, args[:6] + [args[8]], pad_op)
    else:
        return None
    return None if geo is None else ("conv", geo)


def matches(name: str, include: Sequence[str]) -> bool:
    """Whether module ``name`` equals one of ``include`` or matches it as an fnmatch pattern."""
    return any(name == pat or fnmatch.fnmatchcase(name, pat) for pat in include)


def find_node_layers(model: nn.Module, include: Sequence[str] | None = None) -> list[NodeLayer]:
    """The node layers of ``model``: its ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules.

    Order is ``model.named_modules()`` order. ``include`` keeps only modules whose qualified name
    equals one of its entries or matches it as an ``fnmatch`` pattern (``"encoder.*"``).

    In an unflattened ``torch.export`` program (``torch.export.unflatten``) the submodules are
    ``InterpreterModule`` objects: one whose graph is a single ``aten.linear`` / ``aten.conv*d`` of its
    input with its own ``weight`` (optionally after an ``aten.pad``: ``padding_mode``) counts
    as the corresponding node layer.

    Skipped (they cannot be analysed through a forward hook on the module, SPEC §3):
    modules whose weight is not a registered parameter of that name (e.g. parametrized
    weights), and ``out_proj`` of ``nn.MultiheadAttention``, whose weight is used by the
    functional attention kernel without calling the Linear module.
    """
    if isinstance(include, str):
        include = [include]
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    mha_children = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            mha_children.add(f"{name}.out_proj" if name else "out_proj")
    layers: list[NodeLayer] = []
    for name, mod in model.named_modules():
        if name in mha_children or (include is not None and not matches(name, include)):
            continue
        if isinstance(mod, nn.Linear):
            found: tuple[str, dict | None] | None = ("linear", None)
        elif isinstance(mod, _CONV_TYPES):
            found = ("conv", _conv_geometry(mod))
        else:
            found = _exported_layer(mod)
        if found is None:
            continue
        prefix = f"{name}." if name else ""
        wname = prefix + "weight"
        if wname not in param_names or not isinstance(getattr(mod, "weight", None), Tensor):
            continue
        bname = prefix + "bias"
        has_bias = getattr(mod, "bias", None) is not None and bname in param_names
        w = mod.weight
        n = int(w.shape[0])
        p = int(w[0].numel()) + int(has_bias)
        layers.append(NodeLayer(name, found[0], wname, bname if has_bias else None, n, p, found[1]))
    return layers


def node_matrix(params: Mapping[str, Tensor], layer: NodeLayer) -> Tensor:
    """The ``(N, p)`` matrix whose row i is :math:`\\theta_i = [\\mathrm{vec}(W_i);\\ b_i]`.

    Works for any tensors laid out like the parameters (gradients, optimizer state).
    """
    w = params[layer.weight]
    rows = w.reshape(w.shape[0], -1)
    if layer.bias is None:
        return rows
    b = params[layer.bias]
    return torch.cat([rows, b.reshape(-1, 1).to(rows.dtype)], dim=1)
