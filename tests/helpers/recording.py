"""Helpers shared by the recording tests (test_store, test_recorder, test_crash, test_info_cli).

The reference loop is docs/spec.md §2's contract loop run *without* a Recorder; it captures, right before
each ``opt.step()``, what a checkpoint of that step must hold (θ_t, optimizer state, lr per group,
loss, batch). The recorded run is compared against it bit-exactly.

Also imported (by path) from the crash-test child process: keep it free of pytest imports.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zarr
from torch import nn

from trajscope.replay.functional import call_model


# --------------------------------------------------------------------------- models
class TupleNet(nn.Module):
    """Takes a tuple: ``model(*x)`` with ``x = (a, b)``."""

    def __init__(self, d_a: int = 4, d_b: int = 2, hidden: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_a + d_b, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(torch.cat([a, b], dim=-1))))


class KwNet(nn.Module):
    """Takes keywords: ``model(**x)`` with ``x = {"features": ..., "scale": ...}``."""

    def __init__(self, d_in: int = 4, hidden: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(features)) * scale)


class BufferNet(nn.Module):
    """An MLP with buffers of several dtypes (float in the model dtype, int64 counter, bool mask)."""

    def __init__(self, d_in: int = 4, hidden: int = 5, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.register_buffer("running", torch.zeros(hidden))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mask", torch.rand(hidden) > 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if self.training:
            with torch.no_grad():
                self.running.mul_(0.9).add_(h.mean(0).to(self.running.dtype), alpha=0.1)
                self.count += 1
        return self.fc2(h * self.mask.to(h.dtype))


def make_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "tensor":
        from trajscope.zoo import mlp

        model: nn.Module = mlp([4, 6, 3])
    elif kind == "tuple":
        model = TupleNet()
    elif kind == "dict":
        model = KwNet()
    elif kind == "buffers":
        model = BufferNet()
    else:
        raise ValueError(kind)
    return model.to(dtype)


def make_batches(
    kind: str, n: int, seed: int = 1, batch: int = 5, last: int | None = 3, dtype: torch.dtype = torch.float32
) -> list[tuple[Any, torch.Tensor]]:
    """``n`` (inputs, targets) mini-batches for a model of ``kind``; the last one short (``last`` rows)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        b = last if (last is not None and t == n - 1) else batch
        a = torch.randn(b, 4, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randn(b, 3, generator=g, dtype=torch.float64).to(dtype)
        if kind in ("tensor", "buffers"):
            x: Any = a
        elif kind == "tuple":
            x = (a, torch.randn(b, 2, generator=g, dtype=torch.float64).to(dtype))
        elif kind == "dict":
            x = {"features": a, "scale": (torch.rand(b, 1, generator=g, dtype=torch.float64) + 0.5).to(dtype)}
        else:
            raise ValueError(kind)
        out.append((x, y))
    return out


# --------------------------------------------------------------------------- reference loop
@dataclass
class Ref:
    """What the checkpoint of each step must hold, captured right before ``opt.step()``."""

    params: list[dict[str, torch.Tensor]] = field(default_factory=list)
    buffers: list[dict[str, torch.Tensor]] = field(default_factory=list)
    state: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # param name -> key -> value
    lrs: list[list[float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    final: dict[str, torch.Tensor] = field(default_factory=dict)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: Callable,
    batches: list,
    rec: Any = None,
    sched: Any = None,
    ref: Ref | None = None,
) -> Ref | None:
    """docs/spec.md §2's contract loop. With ``rec`` it records; with ``ref`` it captures the reference."""
    names = {id(p): n for n, p in model.named_parameters()}
    for x, y in batches:
        loss = loss_fn(call_model(model, x), y)
        opt.zero_grad()
        loss.backward()
        if rec is not None:
            rec.batch(x, y)
        if ref is not None:
            ref.params.append({n: p.detach().clone() for n, p in model.named_parameters()})
            ref.buffers.append({n: b.detach().clone() for n, b in model.named_buffers()})
            ref.state.append(
                {
                    names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                    for p, st in opt.state.items()
                }
            )
            ref.lrs.append([float(g["lr"]) for g in opt.param_groups])
            ref.losses.append(float(loss.detach()))
        opt.step()
        if sched is not None:
            sched.step()
    if ref is not None:
        ref.final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return ref


# --------------------------------------------------------------------------- comparisons
def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so NaN payloads and -0.0 compare exactly)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitexact(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(bits(got), bits(want)), (
        f"{what}: values differ (max |diff| {(got.double() - want.double()).abs().max().item() if got.numel() else 0})"
    )


def assert_tensors_bitexact(got: dict, want: dict, what: str = "") -> None:
    assert set(got) == set(want), f"{what}: keys {sorted(got)} != {sorted(want)}"
    for k in want:
        assert_bitexact(got[k], want[k], f"{what}[{k}]")


def assert_state_bitexact(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, Any]], what: str) -> None:
    """Recorded optimizer state vs the reference (non-tensor numbers are stored as float64 scalars)."""
    want = {n: {k: v for k, v in st.items() if v is not None} for n, st in want.items()}
    want = {n: st for n, st in want.items() if st}
    assert set(got) == set(want), f"{what}: state params {sorted(got)} != {sorted(want)}"
    for n, st in want.items():
        assert set(got[n]) == set(st), f"{what}[{n}]: keys {sorted(got[n])} != {sorted(st)}"
        for k, v in st.items():
            if torch.is_tensor(v):
                assert_bitexact(got[n][k], v, f"{what}[{n}][{k}]")
            else:
                assert float(got[n][k]) == float(v), f"{what}[{n}][{k}]"


def assert_batch_equal(got: Any, want: Any, what: str = "batch") -> None:
    """Same structure (tuple stays tuple, list stays list, dict keys) and bit-exact leaves."""
    if torch.is_tensor(want):
        assert torch.is_tensor(got), f"{what}: {type(got).__name__} is not a tensor"
        assert_bitexact(got, want, what)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == [str(k) for k in want], f"{what}: keys"
        for k in want:
            assert_batch_equal(got[str(k)], want[k], f"{what}[{k}]")
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want), (
            f"{what}: {type(got).__name__} vs {type(want).__name__}"
        )
        for i, (a, b) in enumerate(zip(got, want)):
            assert_batch_equal(a, b, f"{what}[{i}]")
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"


# --------------------------------------------------------------------------- the crash-test trajectory
# The crash test's child process and the test itself both build this trajectory: the child records
# it, the test recomputes it in-process and compares bit-exactly. Deterministic on CPU with one thread.
CRASH_SIZES = [8, 16, 4]
CRASH_BATCH = 16


def crash_model() -> nn.Module:
    from trajscope.zoo import mlp

    torch.manual_seed(0)
    return mlp(CRASH_SIZES)


def crash_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def crash_batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + t)
    return (
        torch.randn(CRASH_BATCH, CRASH_SIZES[0], generator=g),
        torch.randn(CRASH_BATCH, CRASH_SIZES[-1], generator=g),
    )


def crash_step(
    model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, t: int, rec: Any = None
) -> torch.Tensor:
    x, y = crash_batch(t)
    loss = loss_fn(model(x), y)
    opt.zero_grad()
    loss.backward()
    if rec is not None:
        rec.batch(x, y)
    opt.step()
    return loss


def copy_state_dict(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict())


def index_has_crc(arr: zarr.Array) -> bool:
    """Whether a sharded array's shard index ends with a CRC32C (format version 3)."""
    (codec,) = arr.metadata.to_dict()["codecs"]
    return [c["name"] for c in codec["configuration"]["index_codecs"]] == ["bytes", "crc32c"]


def reseal_index(path, S: int) -> None:
    """Recompute the CRC32C after the shard index of ``path`` (S entries): the index then says what
    its entries say, as a writer that wrote them would have left it."""
    import struct

    import google_crc32c

    with open(path, "r+b") as f:
        entries = f.read(16 * S)
        f.write(struct.pack("<I", google_crc32c.value(entries)))


def drop_chunks(run_dir, array: str, row: int) -> list:
    """Make every chunk of one row of a store array missing, as in a truncated store: its entries
    in the shard index say "never written" (and the index checksum, if any, agrees). Returns the
    shard files touched."""
    import itertools
    from pathlib import Path

    import zarr

    store = Path(run_dir) / "trajectory.zarr"
    arr = zarr.open_array(str(store / array), mode="r")
    S = arr.shards[0]
    grid = [range(-(-n // c)) for n, c in zip(arr.shape[1:], arr.chunks[1:])]
    files = []
    for g in itertools.product(*grid):
        path = store / array / arr.metadata.encode_chunk_key((row // S, *g))
        if path.is_file():
            with open(path, "r+b") as f:
                f.seek(16 * (row % S))
                f.write(b"\xff" * 16)
            if index_has_crc(arr):
                reseal_index(path, S)
            files.append(path)
    return files


def per_record_arrays(store_path: Path) -> dict[str, zarr.Array]:
    """Every array of the store but the probe, opened with plain zarr (no trajscope code)."""
    root = zarr.open_group(str(store_path), mode="r", use_consolidated=False)
    out: dict[str, zarr.Array] = {}

    def walk(g: zarr.Group, prefix: str) -> None:
        for k, v in g.members():
            if isinstance(v, zarr.Group):
                walk(v, f"{prefix}{k}/")
            else:
                out[f"{prefix}{k}"] = v

    walk(root, "")
    return {k: v for k, v in out.items() if not k.startswith("probe/")}


def raw_bytes(t: torch.Tensor) -> bytes:
    """The C-order bytes of a tensor's values (views resolved)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()
