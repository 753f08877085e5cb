"""An ObjectStore that counts the S3 requests it issues, by kind.

S3 bills per request and prices them by kind (GET and HEAD cheap, PUT and
LIST ten times dearer, DELETE free), so the bill and the request rate limits
follow these counts rather than bytes. Counting in one wrapper around the
store, instead of at each call site, means a new read or write path is
counted without anyone remembering to, and the counts cannot drift from
what was really sent.

What is counted is each request s3kv issues, successful or not (S3 bills a
refused conditional PUT or a 404 GET too). Retries made inside the client
library (``max_attempts``) are not visible here and are not counted.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence

from typing_extensions import Buffer

from s3kv.stats import Counters
from s3kv.store.protocol import DELETE_BATCH, ObjectInfo, ObjectPage, ObjectStore, PutMode
from s3kv.store.wrapper import StoreWrapper


class CountingStore(StoreWrapper):
    """Wraps any :class:`ObjectStore`; every call is delegated unchanged."""

    def __init__(self, inner: ObjectStore, counters: Counters) -> None:
        super().__init__(inner)
        self._counters = counters

    async def put(self, key: str, data: Buffer, *, mode: PutMode = "overwrite") -> str | None:
        self._counters.add("put_requests")
        return await self.inner.put(key, data, mode=mode)

    async def get(self, key: str) -> memoryview:
        self._counters.add("get_requests")
        return await self.inner.get(key)

    async def get_range(self, key: str, start: int, end: int) -> memoryview:
        # An empty range is answered without a request by the S3 backends.
        if end > start:
            self._counters.add("get_requests")
        return await self.inner.get_range(key, start, end)

    async def head(self, key: str) -> ObjectInfo:
        self._counters.add("head_requests")
        return await self.inner.head(key)

    async def list(self, prefix: str, *, page_size: int = 1000) -> AsyncIterator[ObjectPage]:
        # One LIST per page; the first is sent even when nothing matches.
        self._counters.add("list_requests")
        first = True
        async for page in self.inner.list(prefix, page_size=page_size):
            if not first:
                self._counters.add("list_requests")
            first = False
            yield page

    async def list_dirs(self, prefix: str) -> builtins.list[str]:
        # Counted as one LIST: more than 1,000 common prefixes take more pages,
        # which the protocol does not reveal.
        self._counters.add("list_requests")
        return await self.inner.list_dirs(prefix)

    async def delete_many(self, keys: Sequence[str]) -> None:
        batches = -(-len(keys) // DELETE_BATCH)
        if batches:
            self._counters.add("delete_requests", batches)
        await self.inner.delete_many(keys)


__all__ = ["CountingStore"]
