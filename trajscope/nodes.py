"""Which modules carry nodes, and the parameter vector of each node (docs/spec.md §3).

A *node* is the parameter block of one output unit:

* ``nn.Linear``: :math:`\\theta_i = [W_{i,:};\\ b_i] \\in \\mathbb{R}^{p}`, ``p = fan_in + 1``;
* ``nn.Conv{1,2,3}d``: :math:`\\theta_i = [\\mathrm{vec}(W_{i,\\dots});\\ b_i]` (its whole filter,
  flattened in C order: input channel of its group major, then kernel offsets), ``p = C_in/groups
  \\cdot \\prod k + 1``.

The ``+1`` is dropped when the module has no bias. Layers of real architectures:

* Hugging Face ``Conv1D`` (GPT-2's projections, ``y = x W + b`` with W of shape (in, out)):
  node i is column i of W plus ``bias[i]``, a Linear node of ``W^T`` (``transposed``);
* ``nn.MultiheadAttention``: each row of the packed ``in_proj_weight`` plus its ``in_proj_bias``
  entry (layer ``<mha>.in_proj``; rows ``[0, E)`` act on the query, ``[E, 2E)`` the key,
  ``[2E, 3E)`` the value) and each row of ``out_proj`` (layer ``<mha>.out_proj``);
* ``nn.Embedding``: row r of the table (kind ``"embedding"``, no bias). Its block is
  :math:`\\partial^2 L/\\partial E_r^2`, summed over every position where token r occurs (and zero
  for a token absent from the batch);
* tied weights (GPT-2's ``lm_head.weight`` *is* ``transformer.wte.weight``): the parameter is one
  node layer, under the first module that owns it (``tied`` names the other uses), and its block
  covers every use.

The module computes these without calling a submodule per unit (MHA's functional kernel), or
uses the parameter more than once, so their blocks are not of the hook form ``X^T E X``; they
take the parameter route (``route="param"``, :mod:`trajscope.curvature.paramroute`), which
differentiates w.r.t. the parameter itself. Other parameters (norms, transposed convolutions, ...)
are not nodes; they enter only the global quantities (docs/spec.md §8).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
        transposed: the weight is stored (fan_in, N) (Hugging Face ``Conv1D``): node i is column i.
        route: ``"hook"`` (blocks from the layer's input and output sensitivities, one forward
            hook on module ``name``) or ``"param"`` (blocks by products w.r.t. the parameter:
            embeddings, attention projections, tied weights).
        tied: the other names of a weight shared with other modules (their uses are in the blocks).
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    n_nodes: int
    node_dim: int
    conv: dict | None = None
    transposed: bool = False
    route: str = "hook"
    tied: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # read back from JSON, tied is a list
        object.__setattr__(self, "tied", tuple(self.tied))

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
    return {
        "dims": dims,
        "kernel_size": k,
        "stride": stride,
        "padding": tuple(lo for lo, _ in pad),
        "dilation": dil,
        "groups": groups,
        "padding_mode": mode,
        "pad": pad,
    }


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
    if len(args) < 2 or args[0] is not src or getattr(args[1], "op", None) != "get_attr" or args[1].target != "weight":
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

    Hugging Face ``Conv1D``, ``nn.Embedding``, ``nn.MultiheadAttention`` (``<name>.in_proj`` and
    ``<name>.out_proj``) and tied weights are node layers too (module doc). Skipped: modules whose
    weight is not a registered parameter of that name (e.g. parametrized weights), a module whose
    weight is another module's (tied: counted once, under its first owner), and an MHA with
    separate q/k/v projection weights (``kdim``/``vdim`` differ from ``embed_dim``).
    """
    if isinstance(include, str):
        include = [include]
    names_of: dict[int, list[str]] = {}
    for n, t in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(t), []).append(n)
    param_names = {n for names in names_of.values() for n in names}
    mha_children = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            mha_children.add(f"{name}.out_proj" if name else "out_proj")
    layers: list[NodeLayer] = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.MultiheadAttention) and (include is None or matches(prefix + "in_proj", include)):
            layers += _layer(
                mod,
                prefix + "in_proj",
                "linear",
                prefix + "in_proj_weight",
                prefix + "in_proj_bias",
                names_of,
                param_names,
                route="param",
            )
        if include is not None and not matches(name, include):
            continue
        route, transposed = "hook", False
        if isinstance(mod, nn.Linear):
            found: tuple[str, dict | None] | None = ("linear", None)
            route = "param" if name in mha_children else "hook"  # MHA's kernel uses the weight, not the module
        elif isinstance(mod, _CONV_TYPES):
            found = ("conv", _conv_geometry(mod))
        elif isinstance(mod, nn.Embedding):
            found, route = ("embedding", None), "param"
        elif _is_hf_conv1d(mod):
            found, transposed = ("linear", None), True
        else:
            found = _exported_layer(mod)
        if found is None:
            continue
        layers += _layer(
            mod, name, found[0], prefix + "weight", prefix + "bias", names_of, param_names, found[1], route, transposed
        )
    return layers


def _is_hf_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``pytorch_utils``), recognised without importing transformers."""
    return (
        type(mod).__name__ == "Conv1D"
        and type(mod).__module__.startswith("transformers")
        and isinstance(getattr(mod, "weight", None), Tensor)
        and mod.weight.dim() == 2
    )


def _layer(
    mod: nn.Module,
    name: str,
    kind: str,
    wname: str,
    bname: str,
    names_of: Mapping[int, list[str]],
    param_names: set[str],
    conv: dict | None = None,
    route: str = "hook",
    transposed: bool = False,
) -> list[NodeLayer]:
    """The node layer of ``mod``'s weight ``wname`` (and bias ``bname``), or none: not a registered
    parameter, or tied to an earlier owner. A tied weight takes the parameter route."""
    attr = wname.rsplit(".", 1)[-1]
    w = getattr(mod, attr, None)
    if wname not in param_names or not isinstance(w, Tensor):
        return []
    owners = names_of[id(w)]
    if owners[0] != wname:  # another module's weight: counted once, by its first owner
        return []
    if len(owners) > 1:
        route = "param"
    battr = bname.rsplit(".", 1)[-1]
    has_bias = getattr(mod, battr, None) is not None and bname in param_names
    n = int(w.shape[1] if transposed else w.shape[0])
    p = int(w.numel() // n) + int(has_bias)
    return [NodeLayer(name, kind, wname, bname if has_bias else None, n, p, conv, transposed, route, tuple(owners[1:]))]


def node_matrix(params: Mapping[str, Tensor], layer: NodeLayer) -> Tensor:
    """The ``(N, p)`` matrix whose row i is :math:`\\theta_i = [\\mathrm{vec}(W_i);\\ b_i]`.

    Works for any tensors laid out like the parameters (gradients, optimizer state).
    """
    w = params[layer.weight]
    rows = (w.T if layer.transposed else w).reshape(layer.n_nodes, -1)
    if layer.bias is None:
        return rows
    b = params[layer.bias]
    return torch.cat([rows, b.reshape(-1, 1).to(rows.dtype)], dim=1)


def node_to_params(rows: Tensor, layer: NodeLayer, weight_shape: Sequence[int]) -> dict[str, Tensor]:
    """Inverse of :func:`node_matrix` for a batch ``(m, N, p)``: ``{weight: (m, *weight_shape), bias: (m, N)}``."""
    m, n = rows.shape[0], layer.n_nodes
    w = rows[..., : rows.shape[-1] - int(layer.has_bias)]
    if layer.transposed:
        w = w.transpose(1, 2)
    out = {layer.weight: w.reshape(m, *weight_shape)}
    if layer.has_bias:
        out[layer.bias] = rows[..., -1].reshape(m, n)
    return out
