"""What the Ray Train loops of UNIT and the DRN share about torch.distributed."""

from __future__ import annotations

from typing import Any


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (all_gather_object); ``[obj]`` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
