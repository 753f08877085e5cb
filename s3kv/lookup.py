"""Finding the longest committed prefix, and staying out of the way when S3 is not.

A prefix is usable only up to its first chunk without a valid manifest, so
manifests are fetched in concurrent windows that double from one (a cold
prompt costs a single GET) and the scan stops at the first miss. Manifests
are parsed strictly; a malformed or foreign one is a miss, never a hit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from s3kv.errors import AccessDenied, ManifestError, NotFound, StoreError
from s3kv.keys import KeyLayout
from s3kv.manifest import Manifest, decode_manifest
from s3kv.store.protocol import Get

log = logging.getLogger("s3kv.lookup")


async def find_committed_prefix(
    store: Get, layout: KeyLayout, namespace: str, chunk_ids: Sequence[str], *, window: int = 8,
    num_heads: int | None = None,
) -> list[Manifest]:
    """Manifests of the longest run of committed chunks at the start of ``chunk_ids``.

    ``num_heads``: the model's KV heads; a manifest whose shards cover any
    other number is a miss.
    """
    found: list[Manifest] = []
    start, size = 0, 1
    while start < len(chunk_ids):
        # Windows of 1, 2, 4, ... so a cold prompt costs one GET, a hit a few round trips.
        batch = chunk_ids[start : start + size]
        start, size = start + len(batch), min(window, size * 2)
        results = await asyncio.gather(
            *(_fetch(store, layout, namespace, cid, num_heads) for cid in batch),
            return_exceptions=True
        )
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
    try:
        body = await store.get(layout.manifest(ns, cid))
    except NotFound:
        return None
    try:
        return decode_manifest(body, layout=layout, expect_namespace=ns, expect_chunk_id=cid,
                               expect_heads=num_heads)
    except ManifestError as exc:
        log.warning("s3kv: ignoring invalid manifest for chunk %s: %s", cid[:12], exc)
        return None


class TTLSet:
    """Bounded set whose members expire: negative lookups, known-bad chunks."""

    def __init__(self, ttl_s: float, max_items: int = 100_000) -> None:
        self._ttl = ttl_s
        self._max = max_items
        self._items: OrderedDict[str, float] = OrderedDict()

    def add(self, key: str) -> None:
        self._items[key] = time.monotonic() + self._ttl
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        exp = self._items.get(key)
        if exp is None:
            return False
        if exp < time.monotonic():
            del self._items[key]
            return False
        return True


class LRUSet:
    """Bounded membership set (chunks known committed or already saved)."""

    def __init__(self, max_items: int = 200_000) -> None:
        self._max = max_items
        self._items: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items


class Breaker:
    """Circuit breaker: after an availability failure, skip S3 for a cool-down.

    Without it every new request would wait out connect timeouts while S3 is
    down; with it requests are served as misses at once, and one probe per
    cool-down finds out when S3 is back.
    """

    def __init__(self, cooldown_s: float = 30.0) -> None:
        self._cooldown = cooldown_s
        self._open_until = 0.0
        self._lock = threading.Lock()
        self._warned = False

    def allow(self) -> bool:
        with self._lock:
            return time.monotonic() >= self._open_until

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            self._open_until = time.monotonic() + self._cooldown
            if not self._warned:
                if isinstance(exc, AccessDenied):
                    # Wrong keys, an expired token or a missing IAM permission:
                    # retrying will not help, the operator has to act.
                    log.warning("s3kv: S3 refused this engine's credentials or permissions "
                                "(%s); check the AWS credential chain and the IAM policy "
                                "(s3:GetObject, s3:PutObject on the cache prefix); serving "
                                "without the cache, retrying in %.0fs", exc, self._cooldown)
                else:
                    log.warning("s3kv: object store unavailable (%s); serving without the "
                                "cache, retrying in %.0fs", exc, self._cooldown)
                self._warned = True

    def success(self) -> None:
        with self._lock:
            if self._warned:
                log.warning("s3kv: object store reachable again; cache re-enabled")
            self._open_until = 0.0
            self._warned = False
