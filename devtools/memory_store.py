"""In-memory store for fast unit tests, benchmarks and the GPU rig.

It passes the same contract suite as the S3 backends, so tests that use it
exercise the real protocol. Not part of the installed package: nothing in
production should ever hold a cache in one process's memory. Besides the
protocol it has a few synchronous helpers (``keys``, ``put_nowait``)
so tests can plant or inspect objects without touching its internals.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from typing_extensions import Buffer

from s3kv.errors import AlreadyExists, InvalidRange, NotFound
from s3kv.store.protocol import Capabilities, ObjectInfo, ObjectPage, PutMode


def _etag(blob: bytes) -> str:
    """S3's ETag for a single-part upload: the quoted MD5 of the body."""
    return '"' + hashlib.md5(blob, usedforsecurity=False).hexdigest() + '"'


class MemoryStore:
    """The ``ObjectStore`` protocol over a dict, with S3's conditional-put and
    range semantics (what the code under test relies on)."""

    def __init__(self, bucket: str = "memory") -> None:
        self.bucket = bucket
        self.capabilities = Capabilities()
        self._objects: dict[str, tuple[bytes, datetime, str]] = {}
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        return None

    # --- synchronous helpers for tests (not part of the ObjectStore protocol) ----

    def keys(self, prefix: str = "") -> builtins.list[str]:
        """Every stored key under ``prefix``, sorted."""
        return sorted(k for k in self._objects if k.startswith(prefix))

    def put_nowait(self, key: str, data: Buffer) -> str:
        """Store ``data`` under ``key`` at once, overwriting: for tests that
        plant objects from synchronous code (no event loop, no lock needed as
        nothing else runs). Returns the ETag."""
        blob = bytes(memoryview(data))
        etag = _etag(blob)
        self._objects[key] = (blob, datetime.now(UTC), etag)
        return etag

    async def put(self, key: str, data: Buffer, *, mode: PutMode = "overwrite") -> str | None:
        blob = bytes(memoryview(data))
        etag = _etag(blob)
        async with self._lock:
            if mode == "create" and key in self._objects:
                raise AlreadyExists(f"{key} already exists", key=key, code="PreconditionFailed")
            self._objects[key] = (blob, datetime.now(UTC), etag)
        return etag

    def _obj(self, key: str) -> tuple[bytes, datetime, str]:
        try:
            return self._objects[key]
        except KeyError:
            raise NotFound(f"NoSuchKey: {key}", key=key, code="NoSuchKey") from None

    async def get(self, key: str) -> memoryview:
        return memoryview(self._obj(key)[0])

    async def get_range(self, key: str, start: int, end: int) -> memoryview:
        blob = self._obj(key)[0]
        if start >= len(blob) and end > start:
            raise InvalidRange(f"range {start}-{end} outside {len(blob)}", key=key)
        return memoryview(blob)[start:end]

    async def head(self, key: str) -> ObjectInfo:
        blob, mtime, etag = self._obj(key)
        return ObjectInfo(key, len(blob), mtime, etag)

    async def list(self, prefix: str, *, page_size: int = 1000) -> AsyncIterator[ObjectPage]:
        keys = self.keys(prefix)
        for i in range(0, len(keys), page_size):
            page = []
            for k in keys[i : i + page_size]:
                if k in self._objects:
                    blob, mtime, etag = self._objects[k]
                    page.append(ObjectInfo(k, len(blob), mtime, etag))
            yield page

    async def list_dirs(self, prefix: str) -> builtins.list[str]:
        dirs = {
            prefix + k[len(prefix) :].split("/", 1)[0] + "/"
            for k in self._objects
            if k.startswith(prefix) and "/" in k[len(prefix) :]
        }
        return sorted(dirs)

    async def delete_many(self, keys: Sequence[str]) -> None:
        async with self._lock:
            for k in keys:
                self._objects.pop(k, None)
