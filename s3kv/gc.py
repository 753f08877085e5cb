"""Deletion plans, and the safety argument for carrying them out.

:class:`Planner` (here) turns one scan into a plan; the executor
(:mod:`s3kv.gc_executor`) carries it out under the rules below. A plan holds
compact rows (namespace, chunk, reason, expected counts), never object keys:
what is deleted is decided per chunk again, right before its delete batch,
from a fresh listing of the chunk prefix. That re-check is what keeps GC safe
next to live writers.

The invariant: a shard named by a manifest that exists is never deleted.

* Chunk deletions (``--older-than``, ``--max-size``, ``--namespace``) delete
  the manifest first, so readers miss from that moment on. A reader that
  fetched the manifest just before may then find a shard gone; the reader
  reports that as an IntegrityError, i.e. a clean recompute, never partial
  data.
* Before any shard is deleted, its chunk is listed again and a manifest
  found there is read: every shard it names is protected. That covers a
  writer whose commit lands while GC runs, including one re-committing a
  chunk whose manifest GC has just deleted.
* Shards not named by a manifest are deleted only once older than the grace
  period. A commit uploads its shards before it writes the manifest, so a
  commit in flight shows shards and no manifest; the grace period is what
  protects them. **The grace period must exceed the commit latency** (upload
  of the slowest rank's shards plus the gather plus the manifest write,
  including retries), or a slow commit can lose shards to GC between the
  re-check and the delete call.
* Shards named by a manifest this run deletes may go at once, unless they
  were rewritten after that manifest was written (a writer of the older key
  form re-committing in place).
* A chunk saved again after its commit (the same engine in a later round,
  or another engine) leaves shards under keys of their own that no manifest
  names: orphans like any other, collected after the grace period. Shard
  keys are unique per save round and uploaded create-only
  (:mod:`s3kv.keys`), so committed bytes are never replaced underneath their
  manifest.

Residual window: S3 offers no conditional delete here. Writers of the
current key form never reuse a key, so a re-commit names fresh shards that
the grace period protects. Writers of the older ``<writer>/r<rank>`` form
(an engine of an earlier version, during an upgrade) rewrite keys in place:
one that rewrites an old shard key and writes its manifest between a
chunk's re-check and the delete call loses that shard; readers then fail
verification and recompute (``s3kv verify --repair`` removes such
manifests). The window is one delete batch long and needs a commit to run
entirely inside it.
"""

from __future__ import annotations

import contextlib
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from s3kv.catalog import Catalog
from s3kv.errors import AccessDenied, NoSuchBucket, StoreError
from s3kv.inventory import ChunkRecord, chunk_record, named_keys, subtree_newest, timestamp
from s3kv.store.protocol import MultipartAdmin

Reason = Literal["orphans", "namespace", "older-than", "max-size"]
REASONS: tuple[Reason, ...] = get_args(Reason)
DEFAULT_GRACE_S = 3600.0


@dataclass(frozen=True)
class Policies:
    """What to delete; every policy given adds to the plan."""

    grace_s: float = DEFAULT_GRACE_S
    orphans: bool = True
    uploads: bool = True
    older_than_s: float | None = None
    max_bytes: int | None = None
    namespaces: tuple[str, ...] = ()


@dataclass(slots=True)
class PlannedChunk:
    namespace: str
    chunk_id: str
    reason: Reason
    delete_manifest: bool
    manifest_modified: float | None
    objects: int
    bytes: int


@dataclass(frozen=True, slots=True)
class PlannedUpload:
    key: str
    upload_id: str
    initiated: float


@dataclass
class Totals:
    chunks: int = 0
    objects: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, int]:
        return {"chunks": self.chunks, "objects": self.objects, "bytes": self.bytes}


@dataclass
class Plan:
    created: float
    policies: Policies
    chunks: list[PlannedChunk] = field(default_factory=list)
    uploads: list[PlannedUpload] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    # Committed bytes outside whole-namespace deletions, before and after the
    # chain policies; computed only when one of them is given.
    committed_bytes: int = 0
    committed_bytes_after: int = 0
    errors: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, Totals]:
        out: dict[str, Totals] = {r: Totals() for r in REASONS}
        for p in self.chunks:
            t = out[p.reason]
            t.chunks += 1
            t.objects += p.objects
            t.bytes += p.bytes
        return out

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.uploads



# --- chain policies -------------------------------------------------------------


def select_chain_deletions(
    records: dict[str, list[ChunkRecord]], policies: Policies, now: float
) -> dict[tuple[str, str], PlannedChunk]:
    """The committed chunks ``--older-than`` and ``--max-size`` delete, by (namespace, chunk).

    Pure: it reads only the records (one list per namespace) and the clock
    given, so the planner and anything replaying a bucket's history (the
    fleet simulation in :mod:`s3kv.replay`) apply exactly the same rules.
    ``--older-than`` goes first, leaves first: a chunk is old only when every
    chunk extending it is (its newest descendant was written by someone who
    had just read the whole prefix). ``--max-size`` then evicts the oldest
    leaf until the rest fits (:func:`evict_oldest_leaves`).
    """
    doomed: dict[tuple[str, str], PlannedChunk] = {}

    def doom(rec: ChunkRecord, reason: Reason) -> None:
        doomed[(rec.namespace, rec.chunk_id)] = PlannedChunk(
            rec.namespace, rec.chunk_id, reason, True, rec.modified, rec.objects, rec.bytes
        )

    if policies.older_than_s is not None:
        cutoff = now - policies.older_than_s
        for recs in records.values():
            newest = subtree_newest(recs)
            # Leaves first: a chunk is old only if all its descendants are.
            for rec in sorted(recs, key=lambda r: r.chunk_index, reverse=True):
                if newest[rec.chunk_id] <= cutoff:
                    doom(rec, "older-than")
    if policies.max_bytes is not None:
        committed = sum(r.bytes for recs in records.values() for r in recs)
        evict_oldest_leaves(records, doomed, doom, policies.max_bytes, committed)
    return doomed


def evict_oldest_leaves(
    records: dict[str, list[ChunkRecord]],
    doomed: dict[tuple[str, str], PlannedChunk],
    doom: Callable[[ChunkRecord, Reason], None],
    budget: int,
    committed: int,
) -> None:
    """Oldest leaf first until the committed bytes fit the budget.

    Only a chunk nothing live extends is ever a candidate, so evicting
    never leaves a hole in a cached prefix; a parent becomes a candidate
    once its last child is gone. Corrupt chunks (``ChunkRecord.corrupt``)
    go before any other: no reader loads them. ``doomed`` holds what earlier policies
    already delete (their bytes are gone from the total), ``committed`` the
    bytes of every record.
    """
    live: dict[tuple[str, str], ChunkRecord] = {}
    for ns, recs in records.items():
        for r in recs:
            if (ns, r.chunk_id) not in doomed:
                live[(ns, r.chunk_id)] = r
    total = committed - sum(p.bytes for p in doomed.values())
    if total <= budget:
        return
    # Chunks no reader can load (a named shard missing or of another size)
    # go first, whatever their age or descendants: those cannot load either.
    for key, r in sorted(live.items(), key=lambda kv: kv[1].modified):
        if total <= budget:
            return
        if r.corrupt:
            del live[key]
            doom(r, "max-size")
            total -= r.bytes
    children: dict[tuple[str, str], int] = {}
    for (ns, _), r in live.items():
        if r.parent_id is not None and (ns, r.parent_id) in live:
            children[(ns, r.parent_id)] = children.get((ns, r.parent_id), 0) + 1
    heap = [(r.modified, ns, cid) for (ns, cid), r in live.items()
            if children.get((ns, cid), 0) == 0]
    heapq.heapify(heap)
    while total > budget and heap:
        _, ns, cid = heapq.heappop(heap)
        rec = live.pop((ns, cid))
        doom(rec, "max-size")
        total -= rec.bytes
        if rec.parent_id is not None and (parent := (ns, rec.parent_id)) in live:
            children[parent] -= 1
            if children[parent] == 0:
                heapq.heappush(heap, (live[parent].modified, ns, rec.parent_id))


# --- planning -----------------------------------------------------------------


class Planner:
    """Turns one scan of the prefix into a :class:`Plan`."""

    def __init__(
        self,
        catalog: Catalog,
        policies: Policies,
        *,
        uploads_store: MultipartAdmin | None = None,
        now: float | None = None,
    ) -> None:
        self._catalog = catalog
        self._policies = policies
        self._uploads = uploads_store
        self._now = time.time() if now is None else now

    async def plan(self, on_progress: Callable[[int, int], None] | None = None) -> Plan:
        """Scan every namespace; ``on_progress(done, total)`` after each one."""
        pol = self._policies
        plan = Plan(self._now, pol)
        need_records = pol.older_than_s is not None or pol.max_bytes is not None
        records: dict[str, list[ChunkRecord]] = {}
        orphan_rows: dict[tuple[str, str], PlannedChunk] = {}
        names = await self._catalog.namespaces()
        for i, ns in enumerate(names):
            if ns in pol.namespaces:
                plan.namespaces.append(ns)
                await self._plan_whole(ns, plan)
            else:
                await self._scan(ns, need_records, records.setdefault(ns, []), orphan_rows)
            if on_progress is not None:
                on_progress(i + 1, len(names))
        doomed = self._chain_policies(records, plan)
        for key, row in orphan_rows.items():
            if key not in doomed:
                plan.chunks.append(row)
            else:  # the chunk goes whole; its orphans go with it
                doomed[key].objects += row.objects
                doomed[key].bytes += row.bytes
        if pol.uploads and self._uploads is not None:
            await self._plan_uploads(plan)
        return plan

    async def _plan_whole(self, ns: str, plan: Plan) -> None:
        async with contextlib.aclosing(self._catalog.chunks(ns)) as groups:
            async for g in groups:
                plan.chunks.append(PlannedChunk(
                    ns, g.chunk_id, "namespace", g.manifest is not None,
                    timestamp(g.manifest) if g.manifest else None, g.objects, g.bytes,
                ))

    async def _scan(
        self,
        ns: str,
        need_records: bool,
        recs: list[ChunkRecord],
        orphan_rows: dict[tuple[str, str], PlannedChunk],
    ) -> None:
        pol = self._policies

        def want(g: Any) -> bool:
            # One save attempt under a manifest is all committed (see Catalog.usage).
            return need_records or (pol.orphans and len(g.uploads) > 1)

        items = self._catalog.scan(ns, want_manifest=want)
        async with contextlib.aclosing(items) as scanned:
            async for item in scanned:
                g = item.objects
                if need_records and (rec := chunk_record(item)) is not None:
                    recs.append(rec)
                if not pol.orphans or item.error is not None:
                    continue
                if g.manifest is None or item.vanished:
                    candidates = g.shards
                elif item.manifest is not None:
                    named = named_keys(item.manifest)
                    candidates = [s for s in g.shards if s.key not in named]
                else:
                    continue
                old = [s for s in candidates if self._now - s.modified >= pol.grace_s]
                if old:
                    orphan_rows[(ns, g.chunk_id)] = PlannedChunk(
                        ns, g.chunk_id, "orphans", False, None, len(old),
                        sum(s.size for s in old),
                    )

    def _chain_policies(
        self, records: dict[str, list[ChunkRecord]], plan: Plan
    ) -> dict[tuple[str, str], PlannedChunk]:
        plan.committed_bytes = sum(r.bytes for recs in records.values() for r in recs)
        doomed = select_chain_deletions(records, self._policies, self._now)
        plan.committed_bytes_after = plan.committed_bytes - sum(p.bytes for p in doomed.values())
        plan.chunks.extend(doomed.values())
        return doomed

    async def _plan_uploads(self, plan: Plan) -> None:
        if self._uploads is None:
            return
        try:
            uploads = await self._uploads.list_multipart_uploads(
                self._catalog.layout.root()
            )
        except (AccessDenied, NoSuchBucket):
            raise
        except StoreError as exc:
            plan.errors.append(f"listing multipart uploads failed: {exc}")
            return
        for u in uploads:
            initiated = u.initiated.timestamp()
            if self._now - initiated >= self._policies.grace_s:
                plan.uploads.append(PlannedUpload(u.key, u.upload_id, initiated))
