"""The commit gather over a GLOO (CPU) group of the TP ranks alone.

The group is used only from each rank's committer thread. It is never vLLM's
own ``cpu_group``: vLLM issues collectives on that group from the main
thread, and two threads issuing collectives on one group can interleave
differently on different ranks.

It is built without any collective of the whole default group: vLLM puts the
ranks of every TP group, pipeline stage and data-parallel engine into one
default group, and ``new_group`` is meant to be called by all of them, in the
same order: it names a group by a per-process count of groups, so two
data-parallel engines forming their commit groups on their own both pick the
same name and the same store keys, and the later one connects to the
earlier one's addresses (seen: it times out). A TP group that re-forms after
a failure the others know nothing about could not use it either. Instead the
group is a ``ProcessGroupGloo`` over a ``PrefixStore`` of the default group's
store, keyed by the TP ranks' global ranks (what
``new_group(use_local_synchronization=True)`` does inside), one prefix per
*epoch*:

* ``<base>/gen`` holds the epoch the ranks should be in. A rank that sees a
  collective fail moves it from its epoch ``e`` to ``e + 1`` with an atomic
  compare-and-set, so every rank of a broken epoch aims at the same next one,
  whichever noticed first; a rank about to gather on a group whose epoch is
  no longer current fails at once instead of waiting for a timeout.
* ``<base>/<e>/joined`` counts the ranks that reached epoch ``e``; the last
  one sets ``<base>/<e>/ready``, and only then is the group built, so a rank
  waiting for a peer that is late (or dead) waits on the store, where waiting
  again later resumes instead of leaving stale addresses behind.
* ``<base>`` itself starts with a per-start-up instance number, so a second
  commit group of the same ranks in one process group never reads keys of
  the first.

The objects are pickled and sent as byte tensors, sizes first, as
``gather_object`` does; every operation is bounded by ``commit_timeout_s``.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, Store
from torch.distributed import distributed_c10d

from s3kv.commit_group import RecoveryImpossible

STARTUP_WAIT_S = 300.0  # how long the first group waits for every rank to arrive


class _Work(Protocol):
    def wait(self) -> Any: ...


class _Backend(Protocol):
    """The collectives of a ``ProcessGroupGloo`` (torch's stubs list them on
    ``ProcessGroup`` only)."""

    def allgather(self, output_tensors: list[list[torch.Tensor]],
                  input_tensors: list[torch.Tensor]) -> _Work: ...

    def gather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
               opts: dist.GatherOptions) -> _Work: ...

    def broadcast(self, tensors: list[torch.Tensor], opts: dist.BroadcastOptions) -> _Work: ...


class GlooGatherer:
    def __init__(self, ranks: list[int], timeout_s: float,
                 store: Store | None = None) -> None:
        self._ranks = list(ranks)
        self.rank = self._ranks.index(dist.get_rank())
        self.world_size = len(self._ranks)
        self._timeout = timedelta(seconds=timeout_s)
        base = store if store is not None else distributed_c10d._get_default_store()
        group_key = "s3kv-commit/" + ",".join(str(r) for r in self._ranks)
        # Every rank of this group adds once per start-up, before it can form
        # the group, so the count names the same instance on every rank.
        instance = (int(base.add(group_key + "/instances", 1)) - 1) // self.world_size
        self._base = base
        self._prefix = f"{group_key}/{instance}"
        self._store = PrefixStore(self._prefix, base)
        self._store.add("gen", 0)  # creates the key; gathers read it without blocking
        self.epoch = 0
        self._target: int | None = 0  # the epoch being formed, None while formed
        self._joined = -1
        self._pg: _Backend | None = None
        self._form(max(timeout_s, STARTUP_WAIT_S))

    # --- collectives ------------------------------------------------------------

    def gather(self, obj: Any) -> list[Any] | None:
        pg = self._current()
        data = _encode(obj)
        sizes = self._sizes(pg, data.numel())
        longest = max(sizes)
        buf = torch.zeros(longest, dtype=torch.uint8)
        buf[: data.numel()] = data
        opts = dist.GatherOptions()
        opts.rootRank = 0
        out = [[torch.empty(longest, dtype=torch.uint8) for _ in sizes]] if self.rank == 0 else []
        pg.gather(out, [buf], opts).wait()
        if self.rank != 0:
            return None
        return [_decode(t[:n]) for t, n in zip(out[0], sizes, strict=True)]

    def broadcast(self, obj: Any) -> Any:
        pg = self._current()
        data = _encode(obj) if self.rank == 0 else torch.empty(0, dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        pg.broadcast([size], opts).wait()
        if self.rank != 0:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        pg.broadcast([data], opts).wait()
        return _decode(data)

    def _sizes(self, pg: _Backend, n: int) -> list[int]:
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        pg.allgather([out], [torch.tensor([n], dtype=torch.int64)]).wait()
        return [int(t.item()) for t in out]

    def _current(self) -> _Backend:
        if self._pg is None:
            raise RuntimeError("the commit group is being re-formed")
        gen = int(self._store.add("gen", 0))
        if gen != self.epoch:
            raise RuntimeError(f"a peer left commit group epoch {self.epoch} (now {gen})")
        return self._pg

    # --- forming -------------------------------------------------------------------

    def reform(self, wait_s: float) -> None:
        try:
            if self._target is None:
                # Drop the broken group first: closing its connections fails a
                # peer still waiting in it at once.
                self._pg = None
                self._target = self._advance(self.epoch)
            self._form(wait_s)
        except dist.DistNetworkError as exc:  # the store's host process is gone
            raise RecoveryImpossible(f"rendezvous store unreachable: {exc}") from exc

    def _advance(self, epoch: int) -> int:
        """Move ``gen`` past ``epoch`` (unless a peer already did); the new target."""
        return int(self._store.compare_set("gen", str(epoch), str(epoch + 1)))

    def _form(self, wait_s: float) -> None:
        target = self._target
        if target is None:
            return
        if self._joined != target:
            self._joined = target
            if int(self._store.add(f"{target}/joined", 1)) == self.world_size:
                self._store.set(f"{target}/ready", "1")
        # Raises DistStoreError if a peer has not arrived yet: call again later.
        self._store.wait([f"{target}/ready"], timedelta(seconds=wait_s))
        try:
            pg = ProcessGroupGloo(PrefixStore(f"{self._prefix}/{target}", self._base),
                                  self.rank, self.world_size, self._timeout)
        except dist.DistNetworkError:
            raise
        except Exception:
            # Everyone arrived, yet connecting failed (a peer died since): try a
            # fresh epoch rather than this one's now stale addresses.
            self._target = self._advance(target)
            raise
        self._pg, self.epoch, self._target = cast(_Backend, pg), target, None


def _encode(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _decode(t: torch.Tensor) -> Any:
    # Only the TP ranks of this engine send here, as torch's gather_object trusts them.
    return pickle.loads(t.numpy().tobytes())
