"""A store that wraps another and passes every call through.

Wrappers (counting, hedging) override only the calls they change; the rest,
and the wrapped store's ``bucket`` and ``capabilities``, show through from
here, so a new protocol method is passed through by every wrapper at once.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence

from typing_extensions import Buffer

from s3kv.store.protocol import Capabilities, ObjectInfo, ObjectPage, ObjectStore, PutMode


class StoreWrapper:
    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner

    # Properties, not copies: what the wrapped store learns about its server
    # later (capabilities) must show through.
    @property
    def bucket(self) -> str:
        return self.inner.bucket

    @bucket.setter
    def bucket(self, value: str) -> None:
        self.inner.bucket = value

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    @capabilities.setter
    def capabilities(self, value: Capabilities) -> None:
        self.inner.capabilities = value

    async def close(self) -> None:
        await self.inner.close()

    async def put(self, key: str, data: Buffer, *, mode: PutMode = "overwrite") -> str | None:
        return await self.inner.put(key, data, mode=mode)

    async def get(self, key: str) -> memoryview:
        return await self.inner.get(key)

    async def get_range(self, key: str, start: int, end: int) -> memoryview:
        return await self.inner.get_range(key, start, end)

    async def head(self, key: str) -> ObjectInfo:
        return await self.inner.head(key)

    def list(self, prefix: str, *, page_size: int = 1000) -> AsyncIterator[ObjectPage]:
        return self.inner.list(prefix, page_size=page_size)

    async def list_dirs(self, prefix: str) -> builtins.list[str]:
        return await self.inner.list_dirs(prefix)

    async def delete_many(self, keys: Sequence[str]) -> None:
        await self.inner.delete_many(keys)


__all__ = ["StoreWrapper"]
