"""aioboto3 backend: the client the design card names.

Retries use botocore's own ``standard`` mode (SlowDown, 5xx, connection
resets with backoff). Request checksums are only computed when S3 requires
them: s3kv checksums every shard itself and verifies on read, and botocore's
default checksumming costs a quarter to a third of PUT throughput on MiB
objects.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from typing_extensions import Buffer

from s3kv.config import StoreSettings
from s3kv.errors import (
    AccessDenied,
    AlreadyExists,
    PreconditionFailed,
    StoreError,
    Unavailable,
    from_s3_error,
)
from s3kv.store.protocol import (
    DELETE_BATCH,
    Capabilities,
    ObjectInfo,
    ObjectPage,
    PutMode,
    UploadInfo,
)


def _addressing(settings: StoreSettings) -> str:
    if settings.addressing_style != "auto":
        return settings.addressing_style
    return "path" if settings.endpoint_url else "virtual"


def _translate(exc: Exception, key: str | None) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return from_s3_error(err.get("Code"), f"{err.get('Code')}: {err.get('Message')}",
                             key=key, status=status)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return AccessDenied("no usable AWS credentials in the standard chain", key=key)
    if isinstance(exc, (BotoConnectionError, HTTPClientError, OSError, TimeoutError)):
        return Unavailable(f"{type(exc).__name__}: {exc}", key=key)
    return StoreError(f"{type(exc).__name__}: {exc}", key=key)


def _body(data: Buffer) -> bytes | bytearray:
    """botocore takes only bytes, bytearray or files: hand over the owner of a view
    that spans a whole bytes/bytearray (no copy), and copy any other buffer once."""
    if isinstance(data, (bytes, bytearray)):
        return data
    mv = memoryview(data)
    owner = mv.obj
    if isinstance(owner, (bytes, bytearray)) and mv.c_contiguous and mv.nbytes == len(owner):
        return owner
    return mv.tobytes()


class Aioboto3Store:
    """An :class:`~s3kv.store.protocol.ObjectStore` over one aiobotocore client."""

    def __init__(self, settings: StoreSettings, client: Any, stack: contextlib.AsyncExitStack):
        self.bucket = settings.bucket
        self.capabilities = Capabilities()
        self._client = client
        self._stack = stack

    @classmethod
    async def open(cls, settings: StoreSettings) -> Aioboto3Store:
        config = Config(
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.request_timeout_s,
            # botocore's "max_attempts" counts retries only; "total_max_attempts"
            # counts every attempt, as settings.max_attempts does.
            retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
            max_pool_connections=max(10, settings.max_concurrency * 2),
            s3={"addressing_style": _addressing(settings)},  # type: ignore[arg-type]
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = aioboto3.Session(region_name=settings.region)
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            session.client(  # type: ignore[call-overload]
                "s3", endpoint_url=settings.endpoint_url, config=config
            )
        )
        return cls(settings, client, stack)

    @property
    def client(self) -> Any:
        """The aiobotocore S3 client every request goes through, for
        instrumentation (``client.meta.events`` hooks) and inspection.
        Requests made on it directly bypass this class's error translation."""
        return self._client

    async def close(self) -> None:
        await self._stack.aclose()

    async def put(self, key: str, data: Buffer, *, mode: PutMode = "overwrite") -> str | None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": _body(data)}
        if mode == "create":
            kwargs["IfNoneMatch"] = "*"
        try:
            resp = await self._client.put_object(**kwargs)
        except Exception as exc:
            err = _translate(exc, key)
            if mode == "create" and isinstance(err, PreconditionFailed):
                raise AlreadyExists(f"{key} already exists", key=key, code=err.code) from None
            raise err from None
        etag = resp.get("ETag")
        return str(etag) if etag is not None else None

    async def get(self, key: str) -> memoryview:
        try:
            resp = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with resp["Body"] as body:
                return memoryview(await body.read())
        except Exception as exc:
            raise _translate(exc, key) from None

    async def get_range(self, key: str, start: int, end: int) -> memoryview:
        if end <= start:
            return memoryview(b"")
        try:
            resp = await self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
            )
            async with resp["Body"] as body:
                return memoryview(await body.read())
        except Exception as exc:
            raise _translate(exc, key) from None

    async def head(self, key: str) -> ObjectInfo:
        try:
            resp = await self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise _translate(exc, key) from None
        return ObjectInfo(key, int(resp["ContentLength"]), resp["LastModified"], resp.get("ETag"))

    async def _pages(self, operation: str, key: str,
                     **kwargs: Any) -> AsyncGenerator[dict[str, Any], None]:
        """One aiobotocore paginator's pages, with its errors translated.

        The paginator raises from inside iteration, so translation wraps each
        step here rather than the caller's loop body (which must not be
        reported as a store error).
        """
        pages = self._client.get_paginator(operation).paginate(Bucket=self.bucket, **kwargs)
        async with contextlib.aclosing(aiter(pages)) as it:
            while True:
                try:
                    resp: dict[str, Any] = await anext(it)
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    raise _translate(exc, key) from None
                yield resp

    async def list(self, prefix: str, *, page_size: int = 1000) -> AsyncIterator[ObjectPage]:
        pages = self._pages("list_objects_v2", prefix, Prefix=prefix,
                            PaginationConfig={"PageSize": page_size})
        async with contextlib.aclosing(pages):
            async for resp in pages:
                page = [
                    ObjectInfo(o["Key"], int(o["Size"]), o["LastModified"], o.get("ETag"))
                    for o in resp.get("Contents", [])
                ]
                if page:
                    yield page

    async def list_dirs(self, prefix: str) -> builtins.list[str]:
        return [p["Prefix"]
                async for resp in self._pages("list_objects_v2", prefix, Prefix=prefix,
                                              Delimiter="/")
                for p in resp.get("CommonPrefixes", [])]

    async def delete_many(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[i : i + DELETE_BATCH]]
            try:
                resp = await self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except Exception as exc:
                raise _translate(exc, None) from None
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise from_s3_error(first.get("Code"), f"delete failed for {len(errors)} keys: "
                                    f"{first.get('Code')} {first.get('Message')}",
                                    key=first.get("Key"))

    async def list_multipart_uploads(self, prefix: str) -> builtins.list[UploadInfo]:
        return [UploadInfo(u["Key"], u["UploadId"], u["Initiated"])
                async for resp in self._pages("list_multipart_uploads", prefix, Prefix=prefix)
                for u in resp.get("Uploads", [])]

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        try:
            await self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except Exception as exc:
            raise _translate(exc, key) from None
