"""Read a bucket prefix as namespaces, chunks and cached prefixes, page by page.

A production prefix holds millions of objects, so nothing here materialises a
listing. Each namespace is listed per two-hex spread prefix (the spreads
exist so that listings can run in parallel, see :mod:`s3kv.keys`), objects are
grouped per chunk as pages arrive, and a group is handed on as soon as the
listing has moved past it. What callers keep is their own choice: counters
for ``du``, compact :class:`ChunkRecord` rows for chain views and GC policies.

S3 lists general-purpose buckets in key order, which is what lets a chunk's
group be closed when the next chunk's first key arrives. Directory buckets
(``--x-s3``) list in no particular order; there a spread is buffered whole
before its groups are handed on, which bounds memory by one spread (1/256 of
a namespace) instead of one chunk.

Manifests are read only where a caller needs their content, with at most
``concurrency`` requests in flight, so a scan costs one LIST per thousand
objects plus, at most, one GET per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Sequence,
)
from typing import Any, Protocol, TypeVar

from s3kv.errors import ManifestError, NotFound, S3KVError
from s3kv.inventory import (
    ChunkObjects,
    ChunkRecord,
    NamespaceUsage,
    ScannedChunk,
    ShardObject,
    chunk_record,
    chunk_usage,
    timestamp,
)
from s3kv.jsondoc import loads_strict
from s3kv.keys import KeyLayout, is_namespace
from s3kv.manifest import Manifest, fetch_manifest
from s3kv.store.protocol import Get, List, ObjectInfo

log = logging.getLogger("s3kv.catalog")

T = TypeVar("T")
R = TypeVar("R")

_HEX = frozenset("0123456789abcdef")
#: A namespace document larger than this is not a fingerprint s3kv wrote.
FINGERPRINT_MAX_BYTES = 64 * 1024


class CatalogStore(List, Get, Protocol):
    """Scanning needs listing and reading, never writing."""


# --- errors -------------------------------------------------------------------


class NamespaceError(S3KVError):
    """A namespace argument does not name exactly one namespace."""


class InvalidNamespace(NamespaceError, ValueError):
    """The text cannot be a namespace id or a prefix of one."""


class NamespaceNotFound(NamespaceError):
    """No namespace under the prefix starts with the given text."""


class AmbiguousNamespace(NamespaceError):
    """More than one namespace starts with the given text."""

    def __init__(self, text: str, matches: list[str]) -> None:
        shown = ", ".join(matches[:5]) + (" ..." if len(matches) > 5 else "")
        super().__init__(f"namespace prefix {text!r} matches {len(matches)} namespaces: {shown}")
        self.matches = matches


# --- bounded concurrency ------------------------------------------------------


async def bounded_map(
    source: AsyncIterator[T], fn: Callable[[T], Awaitable[R]], limit: int
) -> AsyncGenerator[R, None]:
    """Apply ``fn`` to a stream with at most ``limit`` calls in flight, unordered.

    Pulling from ``source`` only when a slot is free is what keeps memory
    bounded: the producer blocks instead of the results piling up.
    """
    pending: set[asyncio.Future[R]] = set()
    try:
        async for item in source:
            while len(pending) >= max(1, limit):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
            pending.add(asyncio.ensure_future(fn(item)))
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
    finally:
        for fut in pending:
            fut.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


# --- the catalog --------------------------------------------------------------


def is_directory_bucket(bucket: str) -> bool:
    """S3 Express directory buckets list keys in no particular order."""
    return bucket.endswith("--x-s3")



class Catalog:
    """Scans one bucket prefix; holds no listing state between calls."""

    def __init__(
        self,
        store: CatalogStore,
        layout: KeyLayout,
        *,
        concurrency: int = 16,
        page_size: int = 1000,
        ordered_listing: bool = True,
        queue_size: int = 256,
    ) -> None:
        self.store = store
        self.layout = layout
        self.concurrency = max(1, concurrency)
        self._page_size = page_size
        self._ordered = ordered_listing
        self._queue_size = queue_size
        self._foreign: dict[str, list[int]] = {}

    # --- namespaces -----------------------------------------------------------

    async def namespaces(self) -> list[str]:
        root = self.layout.root()
        dirs: Sequence[str] = await self.store.list_dirs(root)
        names = (d[len(root):].strip("/") for d in dirs)
        return sorted(n for n in names if is_namespace(n))

    async def resolve_namespace(self, text: str) -> str:
        """A full namespace id from a unique prefix of one (as ``git`` does for commits)."""
        needle = text.strip().lower()
        if not needle or len(needle) > 32 or not set(needle) <= _HEX:
            raise InvalidNamespace(
                f"{text!r} is not a namespace id or a prefix of one (1 to 32 hex digits)"
            )
        matches = [ns for ns in await self.namespaces() if ns.startswith(needle)]
        if not matches:
            raise NamespaceNotFound(
                f"no namespace under s3://{self.store_bucket()}/{self.layout.root()} "
                f"starts with {needle!r}"
            )
        if len(matches) > 1:
            raise AmbiguousNamespace(needle, matches)
        return matches[0]

    def store_bucket(self) -> str:
        return str(getattr(self.store, "bucket", "?"))

    async def fingerprint(self, ns: str) -> dict[str, Any] | None:
        """The namespace document, or ``None``: it is informational and may be absent."""
        try:
            data = await self.store.get(self.layout.namespace_doc(ns))
        except NotFound:
            return None
        if len(data) > FINGERPRINT_MAX_BYTES:
            log.warning("namespace document of %s is %d bytes; ignored", ns, len(data))
            return None
        try:
            doc = loads_strict(data)
        except ValueError:
            log.warning("namespace document of %s is not JSON; ignored", ns)
            return None
        if not isinstance(doc, dict):
            return None
        inner = doc.get("fingerprint")  # the document wraps the fingerprint's fields
        return inner if isinstance(inner, dict) else None

    # --- chunks ---------------------------------------------------------------

    async def spreads(self, ns: str) -> list[str]:
        base = self.layout.namespace_prefix(ns)
        dirs: Sequence[str] = await self.store.list_dirs(base)
        return sorted(
            d for d in dirs if len(name := d[len(base):].strip("/")) == 2 and set(name) <= _HEX
        )

    def foreign(self, ns: str) -> tuple[int, int]:
        """(objects, bytes) under the namespace's spreads that are not s3kv keys,
        as counted by the latest scan of ``ns``."""
        n, b = self._foreign.get(ns, (0, 0))
        return n, b

    def _count_foreign(self, ns: str, info: ObjectInfo) -> None:
        tally = self._foreign.setdefault(ns, [0, 0])
        tally[0] += 1
        tally[1] += info.size

    async def _group(
        self,
        ns: str,
        pages: AsyncIterator[list[ObjectInfo]],
        emit: Callable[[ChunkObjects], Awaitable[None]],
    ) -> None:
        """Group listed objects per chunk, handing each group on once complete."""
        current: ChunkObjects | None = None
        buffered: dict[str, ChunkObjects] = {}
        base = self.layout.namespace_prefix(ns)
        async for page in pages:
            for info in page:
                parsed = self.layout.parse(info.key)
                if parsed is None or parsed.chunk_id is None or parsed.namespace != ns:
                    # The fingerprint and anything beside the spreads is not a chunk's.
                    if info.key.find("/", len(base)) != -1:
                        self._count_foreign(ns, info)
                    continue
                cid = parsed.chunk_id
                if self._ordered:
                    if current is None or current.chunk_id != cid:
                        if current is not None:
                            await emit(current)
                        current = ChunkObjects(ns, cid)
                    group = current
                else:
                    group = buffered.get(cid) or buffered.setdefault(cid, ChunkObjects(ns, cid))
                if parsed.kind == "manifest":
                    group.manifest = info
                elif parsed.writer is not None and parsed.rank is not None:
                    group.shards.append(
                        ShardObject(info.key, parsed.writer, parsed.rank, info.size,
                                    timestamp(info), parsed.round_id)
                    )
        if current is not None:
            await emit(current)
        for group in buffered.values():
            await emit(group)

    async def _list_prefix(
        self, ns: str, prefix: str, emit: Callable[[ChunkObjects], Awaitable[None]]
    ) -> None:
        await self._group(ns, self.store.list(prefix, page_size=self._page_size), emit)

    async def chunk(self, ns: str, cid: str) -> ChunkObjects | None:
        """One chunk's objects as they are now (a fresh listing, for re-checks)."""
        found: list[ChunkObjects] = []

        async def keep(group: ChunkObjects) -> None:
            if group.chunk_id == cid:
                found.append(group)

        await self._list_prefix(ns, self.layout.chunk_prefix(ns, cid), keep)
        return found[0] if found else None

    async def _whole_if_small(self, ns: str) -> list[ObjectInfo] | None:
        """The namespace's listing if it fits one page, else ``None``.

        Listing 256 spreads costs 257 requests; a small namespace is cheaper
        as one. Costs at most two requests when the namespace is large.
        """
        pages = self.store.list(self.layout.namespace_prefix(ns), page_size=self._page_size)
        try:
            first = await anext(pages, None)
            if first is None:
                return []
            if len(first) >= self._page_size or await anext(pages, None) is not None:
                return None
            return first
        finally:
            aclose = getattr(pages, "aclose", None)
            if aclose is not None:
                await aclose()

    async def chunks(self, ns: str) -> AsyncGenerator[ChunkObjects, None]:
        """Every chunk of a namespace, one group at a time, spreads listed in parallel."""
        self._foreign[ns] = [0, 0]  # counted afresh by every scan
        small = await self._whole_if_small(ns)
        if small is not None:
            groups: list[ChunkObjects] = []

            async def one_page() -> AsyncGenerator[list[ObjectInfo], None]:
                yield small

            async def collect(group: ChunkObjects) -> None:
                groups.append(group)

            await self._group(ns, one_page(), collect)
            for group in groups:
                yield group
            return
        async with contextlib.aclosing(self._chunks_by_spread(ns)) as by_spread:
            async for group in by_spread:
                yield group

    async def _chunks_by_spread(self, ns: str) -> AsyncGenerator[ChunkObjects, None]:
        spreads = await self.spreads(ns)
        if not spreads:
            return
        queue: asyncio.Queue[ChunkObjects | None] = asyncio.Queue(self._queue_size)
        todo = iter(spreads)

        async def worker() -> None:
            for spread in todo:
                await self._list_prefix(ns, spread, queue.put)

        workers = [asyncio.ensure_future(worker())
                   for _ in range(min(self.concurrency, len(spreads)))]

        async def finish() -> None:
            try:
                await asyncio.gather(*workers)
            finally:
                with contextlib.suppress(asyncio.CancelledError):
                    await queue.put(None)

        closer = asyncio.ensure_future(finish())
        try:
            while (item := await queue.get()) is not None:
                yield item
            await closer
        finally:
            for task in (*workers, closer):
                task.cancel()
            await asyncio.gather(*workers, closer, return_exceptions=True)

    async def read_manifest(self, ns: str, cid: str) -> Manifest | None:
        """The decoded manifest, ``None`` if absent; ManifestError if malformed."""
        got = await fetch_manifest(self.store, self.layout, ns, cid)
        if got.error is not None:
            raise got.error
        return got.manifest

    async def scan(
        self, ns: str, *, want_manifest: Callable[[ChunkObjects], bool]
    ) -> AsyncGenerator[ScannedChunk, None]:
        """Chunks of ``ns``, with the manifest read for those ``want_manifest`` picks."""

        async def load(group: ChunkObjects) -> ScannedChunk:
            out = ScannedChunk(group)
            if group.manifest is None or not want_manifest(group):
                return out
            try:
                out.manifest = await self.read_manifest(ns, group.chunk_id)
            except ManifestError as exc:
                out.error = str(exc)
            else:
                out.vanished = out.manifest is None
            return out

        groups = self.chunks(ns)
        async with (
            contextlib.aclosing(groups),
            contextlib.aclosing(bounded_map(groups, load, self.concurrency)) as items,
        ):
            async for item in items:
                yield item

    # --- summaries ------------------------------------------------------------

    async def usage(self, ns: str, *, exact: bool = False) -> NamespaceUsage:
        """Committed and orphaned bytes of one namespace.

        A chunk whose shards all come from one save attempt (one writer's
        round) is committed whole without reading its manifest (a manifest
        names one attempt's shards); with ``exact`` or several attempts the
        manifest decides.
        """
        usage = NamespaceUsage(ns)
        async with contextlib.aclosing(
            self.scan(ns, want_manifest=lambda g: exact or len(g.uploads) > 1)
        ) as items:
            async for item in items:
                usage.add(chunk_usage(item))
        usage.foreign_objects, usage.foreign_bytes = self.foreign(ns)
        return usage

    async def records(self, ns: str) -> AsyncGenerator[ChunkRecord | ScannedChunk, None]:
        """A compact record per committed chunk; undecodable ones as ScannedChunk."""
        async with contextlib.aclosing(self.scan(ns, want_manifest=lambda g: True)) as items:
            async for item in items:
                rec = chunk_record(item)
                if rec is not None:
                    yield rec
                elif item.error is not None:
                    yield item
