"""The commit gather over a dedicated GLOO (CPU) process group.

The group is created once per worker (every TP rank calls ``new_group`` in
the same order at start-up) and then used only from each rank's committer
thread. It is never vLLM's own ``cpu_group``: vLLM issues collectives on
that group from the main thread, and two threads issuing collectives on one
group can interleave differently on different ranks.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist


class GlooGatherer:
    def __init__(self, ranks: list[int], timeout_s: float) -> None:
        self._group = dist.new_group(
            ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout_s)
        )
        self.rank = dist.get_rank(self._group)
        self.world_size = dist.get_world_size(self._group)
        self._root = dist.get_global_rank(self._group, 0)

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=self._root, group=self._group)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=self._root, group=self._group)
        return box[0]
