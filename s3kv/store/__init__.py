"""Object-store protocol and backends."""

from __future__ import annotations

from s3kv.config import StoreSettings
from s3kv.store.protocol import (
    Capabilities,
    Delete,
    Get,
    Head,
    List,
    MultipartAdmin,
    ObjectInfo,
    ObjectStore,
    Put,
    PutMode,
    UploadInfo,
)


async def open_store(settings: StoreSettings) -> ObjectStore:
    """Open the configured backend; call from the loop that will use it."""
    if settings.backend == "aioboto3":
        from s3kv.store.s3_aioboto3 import Aioboto3Store

        return await Aioboto3Store.open(settings)
    from s3kv.store.s3_obstore import ObstoreStore

    return await ObstoreStore.open(settings)


__all__ = [
    "Capabilities",
    "Delete",
    "Get",
    "Head",
    "List",
    "MultipartAdmin",
    "ObjectInfo",
    "ObjectStore",
    "Put",
    "PutMode",
    "UploadInfo",
    "open_store",
]
