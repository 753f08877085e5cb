"""Carrying out a GC plan: re-check each chunk right before its deletes.

:mod:`s3kv.gc` holds the safety argument this module implements: its
planner decides *which chunks* from one scan, and
this module decides *which keys*, per chunk, from a fresh listing taken
just before each delete batch. Keeping the two apart keeps the planner free
of deletes and this module free of policies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from s3kv.catalog import Catalog, bounded_map
from s3kv.errors import AccessDenied, ManifestError, NoSuchBucket, NotFound, StoreError
from s3kv.gc import Plan, PlannedChunk, PlannedUpload
from s3kv.inventory import ShardObject, named_keys
from s3kv.keys import KeyLayout
from s3kv.manifest import fetch_manifest
from s3kv.store.protocol import DELETE_BATCH, Delete, Get, List, MultipartAdmin

log = logging.getLogger("s3kv.gc")
T = TypeVar("T")

EventHook = Callable[[str, dict[str, Any]], None]


class GcStore(List, Get, Delete, Protocol):
    """GC lists, reads manifests and deletes; it never writes."""


@dataclass
class GcResult:
    """What a run did; filled in as it goes, so an interrupted run can report it."""

    deleted_manifests: int = 0
    deleted_shards: int = 0
    deleted_bytes: int = 0
    protected_shards: int = 0
    aborted_uploads: int = 0
    deleted_namespace_docs: int = 0
    chunks_done: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def deleted_objects(self) -> int:
        return self.deleted_manifests + self.deleted_shards + self.deleted_namespace_docs


def _batches(chunks: Sequence[PlannedChunk], max_chunks: int) -> list[list[PlannedChunk]]:
    out: list[list[PlannedChunk]] = []
    cur: list[PlannedChunk] = []
    objects = 0
    for p in chunks:
        if cur and (len(cur) >= max_chunks or objects + p.objects > DELETE_BATCH):
            out.append(cur)
            cur, objects = [], 0
        cur.append(p)
        objects += p.objects
    if cur:
        out.append(cur)
    return out


def execution_order(chunks: Sequence[PlannedChunk]) -> list[PlannedChunk]:
    """Chunk deletions leaves first, then orphans.

    A run stopped half-way then leaves shorter prefixes behind, never a
    prefix with a hole in it.
    """
    rank = {"namespace": 0, "older-than": 1, "max-size": 2, "orphans": 3}
    return sorted(chunks, key=lambda p: rank[p.reason])


class Executor:
    """Carries out a plan, re-checking every chunk right before its deletes."""

    def __init__(
        self,
        store: GcStore,
        layout: KeyLayout,
        *,
        grace_s: float,
        concurrency: int = 16,
        batch_chunks: int = 256,
        uploads_store: MultipartAdmin | None = None,
        on_event: EventHook | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._layout = layout
        self._catalog = Catalog(store, layout, concurrency=concurrency)
        self._grace = grace_s
        self._concurrency = max(1, concurrency)
        self._batch_chunks = max(1, batch_chunks)
        self._uploads = uploads_store
        self._on_event = on_event
        self._on_progress = on_progress
        self._clock = clock

    async def execute(self, plan: Plan, result: GcResult | None = None) -> GcResult:
        """Run ``plan``; ``result`` (if given) is filled in as work completes,
        so an interrupted run can still report what it did."""
        res = result if result is not None else GcResult()
        ordered = execution_order(plan.chunks)
        total = len(ordered) + len(plan.uploads)
        for batch in _batches(ordered, self._batch_chunks):
            try:
                await self._run_batch(batch, res)
            except (AccessDenied, NoSuchBucket):
                raise
            except StoreError as exc:
                res.errors.append(f"batch of {len(batch)} chunks: {exc}")
                log.warning("gc batch failed: %s", exc)
            res.chunks_done += len(batch)
            self._progress(res.chunks_done, total)
        for up in plan.uploads:
            await self._abort(up, res)
            self._progress(res.chunks_done + res.aborted_uploads, total)
        for ns in plan.namespaces:
            await self._drop_namespace_doc(ns, res)
        return res

    def _progress(self, done: int, total: int) -> None:
        if self._on_progress is not None:
            self._on_progress(done, total)

    def _emit(self, name: str, **info: Any) -> None:
        if self._on_event is not None:
            self._on_event(name, info)

    async def _run_batch(self, batch: list[PlannedChunk], res: GcResult) -> None:
        self._emit("batch", chunks=[(p.namespace, p.chunk_id) for p in batch])
        doomed = [p for p in batch if p.delete_manifest]
        # What the manifests about to be deleted name: those shards may go at
        # once instead of waiting out the grace period.
        deleted_named: dict[tuple[str, str], frozenset[str]] = {}

        async def read(p: PlannedChunk) -> tuple[PlannedChunk, frozenset[str], int]:
            got = await fetch_manifest(self._store, self._layout, p.namespace, p.chunk_id)
            named = named_keys(got.manifest) if got.manifest is not None else frozenset()
            return p, named, got.size

        manifest_bytes: dict[tuple[str, str], int] = {}
        async for p, named, size in bounded_map(_aiter(doomed), read, self._concurrency):
            deleted_named[(p.namespace, p.chunk_id)] = named
            manifest_bytes[(p.namespace, p.chunk_id)] = size
        if doomed:
            keys = [self._layout.manifest(p.namespace, p.chunk_id) for p in doomed]
            await self._delete(keys)
            found = [n for n in manifest_bytes.values() if n >= 0]
            res.deleted_manifests += len(found)
            res.deleted_bytes += sum(found)
            self._emit("manifests_deleted", keys=keys)

        async def recheck(p: PlannedChunk) -> tuple[list[ShardObject], int]:
            return await self._recheck(p, deleted_named.get((p.namespace, p.chunk_id),
                                                            frozenset()))

        victims: list[ShardObject] = []
        async for doomed_shards, protected in bounded_map(_aiter(batch), recheck,
                                                          self._concurrency):
            victims.extend(doomed_shards)
            res.protected_shards += protected
        self._emit("rechecked", keys=[s.key for s in victims])
        for i in range(0, len(victims), DELETE_BATCH):
            part = victims[i : i + DELETE_BATCH]
            await self._delete([s.key for s in part])
            res.deleted_shards += len(part)
            res.deleted_bytes += sum(s.size for s in part)
        self._emit("shards_deleted", keys=[s.key for s in victims])

    async def _recheck(
        self, p: PlannedChunk, deleted_named: frozenset[str]
    ) -> tuple[list[ShardObject], int]:
        """Which of the chunk's shards may be deleted now, and how many are protected."""
        group = await self._catalog.chunk(p.namespace, p.chunk_id)
        if group is None:
            return [], 0
        protect: frozenset[str] = frozenset()
        if group.manifest is not None:
            try:
                live = await self._catalog.read_manifest(p.namespace, p.chunk_id)
            except ManifestError:
                # Cannot tell what it names: keep everything, verify decides.
                return [], len(group.shards)
            if live is not None:
                protect = named_keys(live)
        now = self._clock()
        victims: list[ShardObject] = []
        protected = 0
        for s in group.shards:
            if s.key in protect:
                protected += 1
            elif now - s.modified >= self._grace or (
                s.key in deleted_named
                and p.manifest_modified is not None
                and s.modified <= p.manifest_modified
            ):
                victims.append(s)
            else:
                protected += 1
        return victims, protected

    async def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), DELETE_BATCH):
            await self._store.delete_many(keys[i : i + DELETE_BATCH])

    async def _abort(self, up: PlannedUpload, res: GcResult) -> None:
        if self._uploads is None:
            return
        try:
            await self._uploads.abort_multipart_upload(up.key, up.upload_id)
        except NotFound:
            pass
        except (AccessDenied, NoSuchBucket):
            raise
        except StoreError as exc:
            res.errors.append(f"abort of upload {up.upload_id} for {up.key}: {exc}")
            return
        res.aborted_uploads += 1

    async def _drop_namespace_doc(self, ns: str, res: GcResult) -> None:
        """The fingerprint goes last, and only once nothing else is left."""
        doc = self._layout.namespace_doc(ns)
        async for page in self._store.list(self._layout.namespace_prefix(ns), page_size=2):
            if any(o.key != doc for o in page):
                return
        await self._delete([doc])
        res.deleted_namespace_docs += 1


async def _aiter(items: Sequence[T]) -> AsyncGenerator[T, None]:
    for item in items:
        yield item
