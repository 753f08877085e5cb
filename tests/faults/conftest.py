"""Fixtures for the fault tests: a fault-injecting proxy in front of moto."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from devtools.fault_proxy import FaultProxy
from s3kv.config import StoreSettings
from s3kv.store import ObjectStore, open_store
from tests.s3server import S3Endpoint

logging.getLogger("werkzeug").setLevel(logging.ERROR)

T = TypeVar("T")
S3_BACKENDS = ("obstore", "aioboto3")


@dataclass(frozen=True)
class Target:
    """One backend talking to one bucket through the proxy."""

    backend: str
    proxy: FaultProxy
    upstream: S3Endpoint
    bucket: str

    def settings(self, **overrides: Any) -> StoreSettings:
        values: dict[str, Any] = {
            "bucket": self.bucket, "endpoint_url": self.proxy.url, "backend": self.backend,
            "connect_timeout_s": 1.0, "request_timeout_s": 5.0, "max_attempts": 3,
        }
        values.update(overrides)
        return StoreSettings(**values)

    def run(self, body: Callable[[ObjectStore], Awaitable[T]], **overrides: Any) -> T:
        """Open a store in a fresh event loop, run ``body`` with it, always close it."""

        async def main() -> T:
            store = await open_store(self.settings(**overrides))
            try:
                return await body(store)
            finally:
                await store.close()

        return asyncio.run(main())

    def upstream_client(self) -> Any:
        """A boto3 client straight to moto, for seeding and checking the bucket."""
        return self.upstream.client()  # type: ignore[no-untyped-call]

    def upstream_keys(self, prefix: str = "") -> list[str]:
        resp = self.upstream_client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in resp.get("Contents", []))


@pytest.fixture(params=S3_BACKENDS)
def target(
    request: pytest.FixtureRequest, fault_proxy: FaultProxy, moto_endpoint: S3Endpoint,
    fault_bucket: str,
) -> Target:
    return Target(request.param, fault_proxy, moto_endpoint, fault_bucket)
