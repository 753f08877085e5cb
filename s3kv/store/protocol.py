"""The store protocol: one small Protocol per capability, obspec style.

Code that only reads asks for :class:`Get`; the GC asks for :class:`List`
and :class:`Delete`; nothing ever checks a capability flag and catches
NotImplementedError. A backend is an :class:`ObjectStore` when it offers the
whole set; :class:`MultipartAdmin` is separate because not every client
library exposes multipart listing.

All methods are coroutines run on the process's I/O loop (see
:mod:`s3kv.aio`). Errors are always :mod:`s3kv.errors` types.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, runtime_checkable

from typing_extensions import Buffer

PutMode = Literal["create", "overwrite"]


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime
    etag: str | None = None


ObjectPage = list[ObjectInfo]


@dataclass(frozen=True)
class UploadInfo:
    key: str
    upload_id: str
    initiated: datetime


@dataclass(frozen=True)
class Capabilities:
    """What the server really does, where it may differ from what S3 documents.

    A backend starts from S3's documented behaviour; what is learned about
    its server later replaces the whole value (``store.capabilities`` is
    assignable, and wrappers pass the assignment through to the store they
    wrap, so every holder sees it).

    ``conditional_create``: a ``mode="create"`` put of an existing key fails
    with AlreadyExists (If-None-Match honoured). Some S3-compatible servers
    ignore the header and overwrite; there two engines committing one chunk
    could overwrite each other's manifest. The engine's index probes it at
    start-up and saves nothing where it does not hold (:mod:`s3kv.index`).
    """

    conditional_create: bool = True


@runtime_checkable
class Put(Protocol):
    async def put(self, key: str, data: Buffer, *, mode: PutMode = "overwrite") -> str | None:
        """Store ``data`` whole; ``mode="create"`` raises AlreadyExists if the key exists.

        Returns the ETag when the server gave one.
        """
        ...


@runtime_checkable
class Get(Protocol):
    async def get(self, key: str) -> memoryview:
        """The whole object; raises NotFound."""
        ...

    async def get_range(self, key: str, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` with one ranged GET."""
        ...


@runtime_checkable
class Head(Protocol):
    async def head(self, key: str) -> ObjectInfo: ...


@runtime_checkable
class List(Protocol):
    def list(self, prefix: str, *, page_size: int = 1000) -> AsyncIterator[ObjectPage]:
        """Pages of objects under ``prefix`` (never the whole listing at once)."""
        ...

    async def list_dirs(self, prefix: str) -> builtins.list[str]:
        """Common prefixes one level below ``prefix`` (delimiter ``/``)."""
        ...


@runtime_checkable
class Delete(Protocol):
    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete keys in batches of at most :data:`DELETE_BATCH`; missing keys
        are not errors."""
        ...


#: S3 DeleteObjects takes at most this many keys per request: ``delete_many``
#: batches by it, and callers that group deletes (GC) size their groups by it.
DELETE_BATCH = 1000


@runtime_checkable
class MultipartAdmin(Protocol):
    async def list_multipart_uploads(self, prefix: str) -> builtins.list[UploadInfo]: ...

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None: ...


@runtime_checkable
class ObjectStore(Put, Get, Head, List, Delete, Protocol):
    """The full set every backend provides."""

    bucket: str
    capabilities: Capabilities

    async def close(self) -> None: ...
