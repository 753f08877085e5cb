"""Backends for the store contract suite: the same tests run against each."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import pytest

from devtools.memory_store import MemoryStore
from s3kv.config import Backend as BackendName
from s3kv.config import StoreSettings
from s3kv.store import ObjectStore, open_store
from tests.s3server import S3Endpoint

# moto's HTTP server logs every request through werkzeug at INFO.
logging.getLogger("werkzeug").setLevel(logging.ERROR)

BACKENDS = ("memory", "obstore", "aioboto3")
S3_BACKENDS = ("obstore", "aioboto3")

T = TypeVar("T")


@dataclass(frozen=True)
class Backend:
    """How to open one backend on one bucket, inside whichever loop runs the test."""

    name: str
    endpoint: S3Endpoint | None = None
    bucket: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.name != "memory"

    def settings(self, **overrides: Any) -> StoreSettings:
        if self.endpoint is None or self.bucket is None:
            raise RuntimeError(f"backend {self.name} has no S3 endpoint")
        base = StoreSettings(
            bucket=self.bucket, endpoint_url=self.endpoint.url,
            backend=cast(BackendName, self.name),
        )
        return replace(base, **overrides)  # type: ignore[arg-type]

    def with_bucket(self, bucket: str) -> Backend:
        return replace(self, bucket=bucket)

    async def open(self, **overrides: Any) -> ObjectStore:
        if not self.is_s3:
            return MemoryStore()
        return await open_store(self.settings(**overrides))

    def run(self, body: Callable[[ObjectStore], Awaitable[T]], **overrides: Any) -> T:
        """Open a store in a fresh event loop, run ``body`` with it, always close it."""

        async def main() -> T:
            store = await self.open(**overrides)
            try:
                return await body(store)
            finally:
                await store.close()

        return asyncio.run(main())


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    name = request.param
    if name == "memory":
        return Backend(name)
    endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
    return Backend(name, endpoint, request.getfixturevalue("bucket"))


@pytest.fixture(params=S3_BACKENDS)
def s3_backend(request: pytest.FixtureRequest) -> Backend:
    endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
    return Backend(request.param, endpoint, request.getfixturevalue("bucket"))


async def put_all(
    store: ObjectStore, keys: Sequence[str], data: bytes = b"", conc: int = 8
) -> None:
    """Write many small objects with bounded concurrency."""
    sem = asyncio.Semaphore(conc)

    async def one(key: str) -> None:
        async with sem:
            await store.put(key, data)

    await asyncio.gather(*(one(k) for k in keys))
