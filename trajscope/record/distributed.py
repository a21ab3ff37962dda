"""Which torch.distributed rank records what: the default process group as seen locally (no collective),
and the root attributes of each rank's store."""

from __future__ import annotations

from typing import Any

from trajscope.io.layout import STORE_NAME, shard_store_name


def _default_group() -> tuple[int, int] | None:
    """(rank, world size) of the initialised default torch.distributed process group, None without
    one. The one place that asks torch.distributed; local queries only: no collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return None


def _process_group(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size) of the default process group when recording is distributed, else (0, 1).
    Local queries only: no collective."""
    if distributed is False:
        return 0, 1
    group = _default_group()
    if group is not None:
        return group
    if distributed:
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )
    return 0, 1


def _distributed() -> bool:
    """Whether this process is one of several torch.distributed ranks, whether or not the recording
    is distributed (``distributed=False`` records each rank alone; its gradients are still all-reduced)."""
    group = _default_group()
    return group is not None and group[1] > 1


def _distributed_meta(meta: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The root attributes of rank ``rank``'s store: rank 0's name the shards to join; a shard store
    describes no parameters, buffers or state (rank 0 records them, identical on every rank)."""
    if not rank:
        return {
            **meta,
            "distributed": {"world_size": world_size, "shards": [shard_store_name(k) for k in range(1, world_size)]},
        }
    return {
        **meta,
        "params": [],
        "buffers": [],
        "trainable": [],
        "signature": None,
        "shard": {"rank": rank, "world_size": world_size, "of": STORE_NAME},
    }
