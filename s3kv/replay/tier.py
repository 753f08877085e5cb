"""The simulated S3 tier: which chunks are committed when, what it was asked, GC.

A chunk is visible to lookups from its commit time on (its manifest is
written then) until a GC run deletes it; a chunk committed or in flight is
never saved again, one deleted may be. Request counts follow the commit and
load design exactly as :mod:`s3kv.capacity` counts them: a commit is one PUT
per stored shard (``min(tp, num_kv_heads)``) plus the manifest; a hit chunk
one manifest GET plus one GET per rank; a lookup that runs into a missing
chunk one GET answered 404; a GC deletion one DELETE per object. Each
request is also counted in its second of virtual time and its key-spread
partition (the two hex characters s3kv puts in front of every chunk key),
for the peak rates S3 must sustain.

GC applies :func:`s3kv.gc.select_chain_deletions`, the selection ``s3kv gc``
itself uses, to records built from the simulated inventory as
:func:`s3kv.inventory.chunk_record` builds them from a listing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from s3kv.admission import AdmissionPolicy
from s3kv.gc import Policies, select_chain_deletions
from s3kv.inventory import ChunkRecord
from s3kv.replay.chunks import ChunkTable
from s3kv.replay.fleet import FleetConfig

#: Request kinds as the report names them.
KINDS: tuple[str, ...] = ("put", "get", "get_miss", "delete")
#: The namespace every simulated chunk lives in (one model, one fleet).
NAMESPACE = "0" * 32
_PARTITIONS = 256


class Tier:
    """One replay's S3 state and request accounting."""

    def __init__(self, table: ChunkTable, cfg: FleetConfig) -> None:
        self.table = table
        self.cfg = cfg
        self.first_byte_s = cfg.profile.first_byte_s
        self.chunk_bytes = cfg.chunk_bytes
        self.objects = cfg.shards + 1
        self.scheduled = bytearray(len(table))  # 1: committed or in flight
        self.commit_t = [0.0] * len(table)
        self.pending: deque[int] = deque()  # in flight, in commit-time order
        self.stored: dict[int, ChunkRecord] = {}  # committed and visible
        self.counts = dict.fromkeys(KINDS, 0)
        self.per_second: dict[str, dict[int, int]] = {k: {} for k in KINDS}
        # (second * 256 + partition) -> requests, per kind and of all kinds
        self.per_partition: dict[str, dict[int, int]] = {k: {} for k in (*KINDS, "all")}
        self.byte_seconds = 0.0
        self.committed_chunks = 0
        self.loaded_chunks = 0
        self.last_commit_s = 0.0
        self.gc_runs = 0
        self.gc_deleted_chunks = 0
        self.gc_deleted_bytes = 0
        self.series: list[tuple[float, int]] = []
        self._policies = Policies(orphans=False, uploads=False, older_than_s=cfg.ttl_s,
                                  max_bytes=cfg.max_bytes)

    def _count(self, kind: str, t: float, partition: int, n: int) -> None:
        sec = int(t)
        d = self.per_second[kind]
        d[sec] = d.get(sec, 0) + n
        key = sec * _PARTITIONS + partition
        for p in (self.per_partition[kind], self.per_partition["all"]):
            p[key] = p.get(key, 0) + n
        self.counts[kind] += n

    # --- reads ---------------------------------------------------------------------------

    def lookup(self, ids: Sequence[int], start: int, limit: int, now: float) -> int:
        """How many chunks from ``start`` on (before ``limit``) are committed at
        ``now``: the manifest GETs that find them, and the one 404 that ends the
        lookup if it stops short of ``limit``."""
        scheduled, commit_t, partition = self.scheduled, self.commit_t, self.table.partition
        j = start
        while j < limit:
            c = ids[j]
            if not scheduled[c] or commit_t[c] > now:
                break
            self._count("get", now, partition[c], 1)
            j += 1
        if j < limit:
            self._count("get_miss", now, partition[ids[j]], 1)
        return j - start

    def load(self, ids: Sequence[int], now: float) -> None:
        """Loads of hit chunks: one GET per rank each (each rank fetches its heads)."""
        tp, partition = self.cfg.tp, self.table.partition
        for c in ids:
            self._count("get", now, partition[c], tp)
        self.loaded_chunks += len(ids)

    # --- writes --------------------------------------------------------------------------

    def offer(self, ids: Sequence[int], finish: float, policy: AdmissionPolicy) -> None:
        """A prefill finished: its full chunks not committed or in flight go to the
        engine's admission policy; admitted ones commit one round trip later."""
        scheduled, commit_t, cids = self.scheduled, self.commit_t, self.table.ids
        at = finish + self.first_byte_s
        objects, partition = self.objects, self.table.partition
        for c in ids:
            if scheduled[c]:
                continue
            # "requested" mode: no request in a trace asks for saving.
            if not policy.admit(cids[c], False):
                continue
            scheduled[c] = 1
            commit_t[c] = at
            self.pending.append(c)
            self._count("put", at, partition[c], objects)
            self.committed_chunks += 1
            self.last_commit_s = at

    def flush(self, now: float) -> None:
        """Commits whose manifests are written by ``now`` enter the inventory."""
        pending, commit_t, table = self.pending, self.commit_t, self.table
        while pending and commit_t[pending[0]] <= now:
            c = pending.popleft()
            parent = table.parent[c]
            self.stored[c] = ChunkRecord(
                namespace=NAMESPACE, chunk_id=table.ids[c],
                parent_id=table.ids[parent] if parent >= 0 else None,
                chunk_index=table.index[c], tokens=table.chunk_tokens,
                bytes=self.chunk_bytes, objects=self.objects, modified=commit_t[c],
                tp_size=self.cfg.tp)

    # --- GC and storage ------------------------------------------------------------------

    def gc(self, now: float) -> None:
        """One ``s3kv gc`` run at ``now`` over what is committed by then."""
        self.flush(now)
        self.gc_runs += 1
        if not self._may_delete(now):
            return
        doomed = select_chain_deletions({NAMESPACE: list(self.stored.values())},
                                        self._policies, now)
        for planned in doomed.values():
            c = self.table.number(planned.chunk_id)
            del self.stored[c]
            self.scheduled[c] = 0
            self.byte_seconds += self.chunk_bytes * (now - self.commit_t[c])
            self._count("delete", now, self.table.partition[c], planned.objects)
            self.gc_deleted_chunks += 1
            self.gc_deleted_bytes += planned.bytes

    def _may_delete(self, now: float) -> bool:
        """False only where the selection is sure to return nothing: no chunk old
        enough for ``--older-than`` and everything within ``--max-size``. Frequent
        GC runs over a large inventory then cost nothing until there is work."""
        pol = self._policies
        if not self.stored:
            return False
        if pol.max_bytes is not None and self.stored_bytes > pol.max_bytes:
            return True
        if pol.older_than_s is None:
            return False
        # ``stored`` fills in commit order, so its first record is the oldest.
        oldest = next(iter(self.stored.values())).modified
        return oldest <= now - pol.older_than_s

    @property
    def stored_bytes(self) -> int:
        return len(self.stored) * self.chunk_bytes

    def sample(self, now: float) -> None:
        self.flush(now)
        if not self.series or self.series[-1][0] != now:
            self.series.append((now, self.stored_bytes))

    def close(self, end: float) -> None:
        """The replay ends at ``end``: stored bytes count until then."""
        self.flush(end)
        for c in self.stored:
            self.byte_seconds += self.chunk_bytes * (end - self.commit_t[c])

    # --- peaks ---------------------------------------------------------------------------

    def peak_rps(self) -> dict[str, float]:
        """Per kind, the requests of its busiest second of virtual time."""
        return {k: float(max(d.values(), default=0)) for k, d in self.per_second.items()}

    def busiest_partition_rps(self, kind: str = "all") -> float:
        """Requests of ``kind`` that the busiest partition took in its busiest second."""
        return float(max(self.per_partition[kind].values(), default=0))


__all__ = ["KINDS", "NAMESPACE", "Tier"]
