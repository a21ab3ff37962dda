"""A distributed run's other ranks: their batch shards, losses and forward states, each in its own
store beside ``trajectory.zarr``, joined to rank 0's per step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trajscope.errors import DamagedRecordError, TrajscopeError
from trajscope.io.layout import shard_store_name
from trajscope.io.records import ForwardState

if TYPE_CHECKING:
    from trajscope.io.reader import TrajectoryReader


class _RankShards:
    """The batch shards of ranks 1 .. W-1 of a distributed run (rank 0's is the main store's batch),
    each in its own store :func:`shard_store_name` (no rank waits for another while recording).

    The batch of step t is the union of the ranks' shards of t in rank order, as DDP's averaged
    gradient used it. A rank's store is read again when it lacks t (its writer may be a commit
    behind); a shard still missing, or not matching rank 0's structure, is a DamagedRecordError for
    step t alone (a rank whose recorder stopped damages only the steps after it stopped)."""

    def __init__(self, run_dir: Path, world_size: int, open_store: Callable[[Path, str], TrajectoryReader]) -> None:
        self.run_dir, self.world_size = run_dir, world_size
        self._open = open_store  # TrajectoryReader (passed in: it imports this module)
        self._readers: dict[int, TrajectoryReader | str] = {}
        self._rows: dict[int, dict[int, int]] = {}  # rank -> {step: its row there}
        self._mean: np.ndarray | None = None  # mean_loss, until a store is read again

    def reader(self, k: int, refresh: bool = False) -> TrajectoryReader | str:
        """Rank k's shard store, or why it cannot be read."""
        if refresh or k not in self._readers:
            name = shard_store_name(k)
            try:
                rd: TrajectoryReader | str = self._open(self.run_dir, name)
            except TrajscopeError as e:
                rd = (
                    str(e)
                    if (self.run_dir / name).exists()
                    else f"rank {k} recorded nothing, there is no {name}: create the Recorder on every rank, with the "
                    f"same path (or pass distributed=False to record rank 0's shard alone)"
                )
            self._readers[k], self._mean = rd, None
            # the last row of a step: a restart re-records it after the rows it invalidated
            self._rows[k] = {int(st): r for r, st in enumerate(rd.steps)} if not isinstance(rd, str) else {}
        return self._readers[k]

    def stores(self, store: Path) -> list[TrajectoryReader]:
        """Every rank's shard store (for the integrity checks); one that cannot be opened is damage."""
        out = []
        for k in range(1, self.world_size):
            rd = self.reader(k, refresh=True)
            if isinstance(rd, str):
                raise DamagedRecordError(
                    store, shard_store_name(k), None, f"rank {k}'s batch shards cannot be read: {rd}"
                )
            out.append(rd)
        return out

    def _row(self, k: int, step: int) -> tuple[TrajectoryReader | str, int | None]:
        """Rank k's store and its row of ``step`` (None: not there), read again once if absent."""
        rd = self.reader(k)
        if step not in self._rows[k]:
            rd = self.reader(k, refresh=True)
        return rd, self._rows[k].get(step)

    def missing(self, steps: np.ndarray) -> dict[int, np.ndarray]:
        """Per rank k > 0, the ``steps`` its store has no record of (its recorder stopped or lags)."""
        for k in range(1, self.world_size):
            self.reader(k, refresh=True)
        return {k: steps[~np.isin(steps, list(self._rows[k]))] for k in range(1, self.world_size)}

    def mean_loss(self, steps: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Per step, the mean of rank 0's loss ``own`` and the other ranks' (NaN where one is missing)."""
        if self._mean is None or len(self._mean) != len(steps):
            losses = [own]
            for k in range(1, self.world_size):
                rd, rows = self.reader(k), self._rows[k]
                theirs = rd.losses if not isinstance(rd, str) else np.zeros(0)
                losses.append(np.array([theirs[rows[s]] if s in rows else np.nan for s in steps.tolist()]))
            self._mean = np.mean(losses, axis=0)
        return self._mean

    def forward(self, step: int, own: list[ForwardState]) -> list[ForwardState]:
        """Rank 0's forward states ``own`` of ``step`` followed by those of ranks 1 .. W-1 (``[]`` where a
        rank has none: the step then replays in eval mode, said at analysis)."""
        out = list(own)
        for k in range(1, self.world_size):
            rd, r = self._row(k, step)
            theirs = rd._own_forward(r) if not isinstance(rd, str) and r is not None else None
            if not theirs:
                return []
            out += theirs
        return out

    def join(
        self, store: Path, step: int, meta: Mapping[str, Any], leaves: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Rank 0's ``leaves`` of ``step`` followed, along the batch axis, by those of ranks 1 .. W-1."""
        parts = [leaves]
        for k in range(1, self.world_size):
            name = shard_store_name(k)
            rd, r = self._row(k, step)

            def damaged(problem: str) -> DamagedRecordError:
                return DamagedRecordError(store, name, step, f"rank {k}'s batch shard {problem}")

            if r is None:
                why = rd if isinstance(rd, str) else "its recorder stopped before this step or has not written it yet"
                raise damaged(f"is missing ({why})")
            if rd._records[r, 2] < 0:
                raise damaged(f"is missing (rank 0 gave a batch for this step, rank {k} did not)")
            if rd.attrs.get("batch") != meta:
                raise damaged("has another structure or dtype than rank 0's")
            parts.append(rd._batch_leaves(r))
        out = {}
        for key, first in leaves.items():
            if first.dim() == 0:
                out[key] = first
                continue
            shards = [p[key] for p in parts]
            if any(t.shape[1:] != first.shape[1:] for t in shards):
                raise DamagedRecordError(
                    store,
                    f"batch/{key}",
                    step,
                    f"the ranks' shards differ in trailing shape ({[list(t.shape) for t in shards]})",
                )
            out[key] = torch.cat(shards)
        return out
