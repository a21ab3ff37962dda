"""Tensors to stored rows and back: storage dtypes (bf16 as its bit pattern), the packed rows
of many tensors per dtype (:class:`Slot`), the batch tree (flattened to named leaves and a JSON
spec) and the optimizer hyperparameters (numeric, tuples flattened)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from trajscope.errors import TrajscopeError


# --------------------------------------------------------------------------- dtypes and packing
def storage_dtype(dtype: torch.dtype) -> tuple[str, np.dtype]:
    """(pack name, numpy storage dtype) for a torch dtype; bf16 keeps its bit pattern as uint16."""
    if dtype == torch.bfloat16:
        return "bfloat16", np.dtype("uint16")
    if dtype == torch.bool:
        return "bool", np.dtype("bool")
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return np_dtype.name, np_dtype


def torch_dtype(name: str) -> torch.dtype:
    if name == "bfloat16":
        return torch.bfloat16
    if name == "bool":
        return torch.bool
    return torch.from_numpy(np.empty(0, dtype=name)).dtype


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one tensor lives inside a packed row."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pack: str
    offset: int
    numel: int

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.pack, self.offset, self.numel]

    @classmethod
    def from_json(cls, j: Sequence) -> Slot:
        return cls(j[0], j[1], tuple(j[2]), j[3], j[4], j[5])


def make_layout(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[Slot]:
    """Assign every tensor a slot in the pack of its storage dtype, in the given order."""
    offsets: dict[str, int] = {}
    slots = []
    for name, t in tensors:
        pack, _ = storage_dtype(t.dtype)
        off = offsets.get(pack, 0)
        slots.append(Slot(name, pack, tuple(t.shape), pack, off, t.numel()))
        offsets[pack] = off + t.numel()
    return slots


def pack_sizes(layout: Sequence[Slot]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for s in layout:
        sizes[s.pack] = max(sizes.get(s.pack, 0), s.offset + s.numel)
    return sizes


def pack(layout: Sequence[Slot], tensors: Sequence[torch.Tensor], alloc: Any = None) -> dict[str, torch.Tensor]:
    """Concatenate tensors (in layout order) into one flat CPU tensor per pack: one copy, detached.

    The copy is what isolates the snapshot from the optimizer's in-place update that follows.
    ``alloc(shape, dtype)`` may hand out a reusable CPU buffer to copy into (or None).
    """
    by_pack: dict[str, list[torch.Tensor]] = {}
    for slot, t in zip(layout, tensors):
        by_pack.setdefault(slot.pack, []).append(t.detach().reshape(-1))
    out = {}
    for name, parts in by_pack.items():
        buf = alloc((sum(p.numel() for p in parts),), parts[0].dtype) if alloc is not None else None
        if buf is not None:
            if len(parts) > 1 and parts[0].device.type == "cpu":
                torch.cat(parts, out=buf)
            else:
                buf.copy_(torch.cat(parts) if len(parts) > 1 else parts[0])
            out[name] = buf
            continue
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        out[name] = flat.to("cpu")
    return out


def _to_numpy(flat: torch.Tensor) -> np.ndarray:
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _from_numpy(a: np.ndarray, dtype_name: str) -> torch.Tensor:
    a = np.asarray(a, order="C")  # not ascontiguousarray: it turns a 0-d leaf into shape (1,)
    if dtype_name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def unpack(layout: Sequence[Slot], rows: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack` for one stored row per pack."""
    out = {}
    for s in layout:
        flat = rows[s.pack][s.offset : s.offset + s.numel]
        if s.pack == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(flat).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(flat))
        out[s.name] = t.reshape(s.shape)
    return out


# --------------------------------------------------------------------------- batch structure
def flatten_batch(obj: Any, prefix: str = "") -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """Structure spec (JSON) and named tensor leaves of a tensor / tuple / list / dict / None tree."""
    leaves: list[tuple[str, torch.Tensor]] = []

    def walk(o: Any, key: str) -> Any:
        if isinstance(o, torch.Tensor):
            leaves.append((key, o))
            return {"t": "tensor", "leaf": key}
        if o is None:
            return {"t": "none"}
        if isinstance(o, (tuple, list)):
            return {"t": type(o).__name__, "items": [walk(v, f"{key}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, Mapping):
            return {"t": "dict", "items": {str(k): walk(v, f"{key}.{_leaf_part(k)}") for k, v in o.items()}}
        if isinstance(o, (int, float, bool)):
            return {"t": "const", "value": o}
        raise TypeError(f"cannot record a batch element of type {type(o).__name__}")

    spec = walk(obj, prefix)
    return spec, leaves


def _leaf_part(k: Any) -> str:
    """A dict key as part of a leaf name, which names an array folder: path separators escaped,
    so that a key like ``"../x"`` cannot write outside the store (the spec keeps the key as is)."""
    return str(k).replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")


def unflatten_batch(spec: Any, leaves: Mapping[str, torch.Tensor]) -> Any:
    t = spec["t"]
    if t == "tensor":
        return leaves[spec["leaf"]]
    if t == "none":
        return None
    if t == "const":
        return spec["value"]
    if t in ("tuple", "list"):
        items = [unflatten_batch(s, leaves) for s in spec["items"]]
        return tuple(items) if t == "tuple" else items
    if t == "dict":
        return {k: unflatten_batch(s, leaves) for k, s in spec["items"].items()}
    raise TrajscopeError(f"unknown batch structure node {t!r}: the store may come from a newer trajscope")


# --------------------------------------------------------------------------- hyperparameters
def numeric_hparams(group: Mapping[str, Any]) -> dict[str, float]:
    """The numeric hyperparameters of a param group, tuples flattened (betas -> betas.0, betas.1)."""
    out: dict[str, float] = {}
    for k, v in group.items():
        if k == "params":
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
            for i, x in enumerate(v):
                out[f"{k}.{i}"] = float(x)
    return out


def restore_hparams(names: Sequence[str], values: np.ndarray, bool_keys: Sequence[str]) -> dict[str, Any]:
    """Inverse of :func:`numeric_hparams` for one group (NaN = absent)."""
    out: dict[str, Any] = {}
    tuples: dict[str, dict[int, float]] = {}
    for name, v in zip(names, values):
        if np.isnan(v):
            continue
        base, _, idx = name.rpartition(".")
        if base and idx.isdigit():
            tuples.setdefault(base, {})[int(idx)] = float(v)
        elif name in bool_keys:
            out[name] = bool(v)
        else:
            out[name] = float(v)
    for base, items in tuples.items():
        out[base] = tuple(items[i] for i in sorted(items))
    return out


def _float(v: Any) -> float:
    """A float from a number or a 0-d tensor (on any device: the writer thread may wait for it)."""
    return float(v.detach().to("cpu", torch.float64)) if isinstance(v, torch.Tensor) else float(v)
