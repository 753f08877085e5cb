"""Finding the longest committed prefix, and the small sets that remember answers.

A prefix is usable only up to its first chunk without a valid manifest, so
manifests are fetched in concurrent windows that double from one (a cold
prompt costs a single GET) and the scan stops at the first miss. Manifests
are parsed strictly; a malformed or foreign one is a miss, never a hit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from s3kv.errors import NotFound, StoreError
from s3kv.keys import KeyLayout
from s3kv.manifest import Manifest, fetch_manifest
from s3kv.store.protocol import Get

log = logging.getLogger("s3kv.lookup")
V = TypeVar("V")


async def find_committed_prefix(
    store: Get, layout: KeyLayout, namespace: str, chunk_ids: Sequence[str], *, window: int = 8,
    num_heads: int | None = None, progress: list[Manifest] | None = None,
    on_round: Callable[[float], None] | None = None,
) -> list[Manifest]:
    """Manifests of the longest run of committed chunks at the start of ``chunk_ids``.

    ``num_heads``: the model's KV heads; a manifest whose shards cover any
    other number is a miss. ``progress``, if given, grows by each round's hits
    as they arrive, so a caller whose deadline passes can use the prefix found
    so far. ``on_round`` gets each round trip's duration (the store's latency,
    as the deadlines see it).
    """
    found: list[Manifest] = [] if progress is None else progress
    start, size = 0, 1
    while start < len(chunk_ids):
        # Windows of 1, 2, 4, ... so a cold prompt costs one GET, a hit a few round trips.
        batch = chunk_ids[start : start + size]
        start, size = start + len(batch), min(window, size * 2)
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(_fetch(store, layout, namespace, cid, num_heads) for cid in batch),
            return_exceptions=True
        )
        if on_round is not None and not any(
                isinstance(r, BaseException) and not isinstance(r, NotFound) for r in results):
            on_round(time.monotonic() - t0)
        for res in results:
            if isinstance(res, BaseException):
                if isinstance(res, StoreError) and not isinstance(res, NotFound):
                    raise res
                return found
            if res is None:
                return found
            found.append(res)
    return found


async def _fetch(store: Get, layout: KeyLayout, ns: str, cid: str,
                 num_heads: int | None) -> Manifest | None:
    got = await fetch_manifest(store, layout, ns, cid, expect_heads=num_heads)
    if got.error is not None:
        log.warning("s3kv: ignoring invalid manifest for chunk %s: %s", cid[:12], got.error)
    return got.manifest


class BoundedCache(Generic[V]):
    """The scheduler's bounded caches (manifests, chunks known missing, bad or
    committed): least recently added out first, and with ``ttl_s`` entries
    that expire, so a cache never outgrows ``max_items`` nor outlives what it
    may assume about the bucket."""

    def __init__(self, max_items: int, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._max = max_items
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def put(self, key: str, value: V) -> None:
        expires = math.inf if self._ttl is None else self._clock() + self._ttl
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < self._clock():
            del self._items[key]
            return None
        return item[1]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def discard(self, key: str) -> None:
        self._items.pop(key, None)


class TTLSet(BoundedCache[bool]):
    """Bounded set whose members expire: negative lookups, known-bad chunks."""

    def __init__(self, ttl_s: float, max_items: int = 100_000) -> None:
        super().__init__(max_items, ttl_s)

    def add(self, key: str) -> None:
        self.put(key, True)


class LRUSet(BoundedCache[bool]):
    """Bounded membership set (chunks known committed or already saved)."""

    def __init__(self, max_items: int = 200_000) -> None:
        super().__init__(max_items)

    def add(self, key: str) -> None:
        self.put(key, True)
