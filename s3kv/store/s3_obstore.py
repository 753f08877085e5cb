"""obstore backend (the default): Rust HTTP client, zero-copy buffers.

Endpoint and region resolve exactly as boto3 resolves them (settings, then
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / shared config files), and
credentials come from the standard boto3 chain through obstore's own boto3
credential provider (which refreshes temporary credentials), so both backends
honour the same AWS configuration.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import boto3
import obstore
from obstore import exceptions as oe
from obstore.auth.boto3 import Boto3CredentialProvider
from obstore.store import S3Store
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
from s3kv.store.protocol import DELETE_BATCH, Capabilities, ObjectInfo, ObjectPage, PutMode

_CODE_RE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_STATUS_RE = re.compile(r"(?:status(?: code)?:?\s*|HTTP status server error \()(\d{3})")
_CREDENTIAL_TTL = timedelta(minutes=5)


class _ChainCredentials(Boto3CredentialProvider):
    """obstore's boto3 provider, with s3kv's error type and a repr that hides secrets.

    The TTL is shorter than obstore's 30 min default: botocore refreshes
    temporary credentials 10-15 min before they expire, so a frozen copy
    cached for 30 min could outlive them; 5 min always stays inside that margin.
    """

    def __init__(self, session: boto3.session.Session) -> None:
        try:
            super().__init__(session, ttl=_CREDENTIAL_TTL)
        except ValueError:  # obstore's way of saying the chain found nothing
            raise AccessDenied("no usable AWS credentials in the standard chain") from None

    def __repr__(self) -> str:
        return "<aws credential chain>"


def _translate(exc: Exception, key: str | None) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    msg = str(exc)
    if isinstance(exc, oe.AlreadyExistsError):
        return AlreadyExists(f"{key} already exists", key=key, code="PreconditionFailed")
    if isinstance(exc, oe.PreconditionError):
        return PreconditionFailed(msg[:300], key=key, code="PreconditionFailed")
    if isinstance(exc, oe.NotFoundError):
        code = "NoSuchBucket" if "NoSuchBucket" in msg else "NoSuchKey"
        return from_s3_error(code, msg[:300], key=key)
    if isinstance(exc, (oe.PermissionDeniedError, oe.UnauthenticatedError)):
        return AccessDenied(msg[:300], key=key, code="AccessDenied")
    code_m = _CODE_RE.search(msg)
    status_m = _STATUS_RE.search(msg)
    if code_m or status_m:
        return from_s3_error(
            code_m.group(1) if code_m else None,
            msg[:300],
            key=key,
            status=int(status_m.group(1)) if status_m else None,
        )
    if any(s in msg for s in ("error sending request", "Connection refused", "timed out",
                              "connection", "dns error")):
        return Unavailable(msg[:300], key=key)
    return StoreError(msg[:300], key=key)


class ObstoreStore:
    """An :class:`~s3kv.store.protocol.ObjectStore` over an obstore ``S3Store``."""

    def __init__(self, settings: StoreSettings) -> None:
        session = boto3.session.Session(region_name=settings.region)
        # Creating a client performs no request; it resolves endpoint and region
        # from settings, environment and config files the way boto3 would.
        probe = session.client("s3", endpoint_url=settings.endpoint_url)
        endpoint = settings.endpoint_url or (
            probe.meta.endpoint_url if _custom_endpoint(probe.meta.endpoint_url) else None
        )
        region = probe.meta.region_name or "us-east-1"
        style = settings.addressing_style
        virtual = style == "virtual" or (style == "auto" and endpoint is None)
        kwargs: dict[str, Any] = {
            "region": region,
            "virtual_hosted_style_request": virtual,
        }
        if endpoint:
            kwargs["endpoint"] = endpoint
        self.bucket = settings.bucket
        self.capabilities = Capabilities()
        self._where = f"bucket={settings.bucket!r}, region={region!r}, endpoint={endpoint!r}"
        self._store = S3Store(
            settings.bucket,
            client_options={
                "connect_timeout": timedelta(seconds=settings.connect_timeout_s),
                "timeout": timedelta(seconds=settings.request_timeout_s),
                "allow_http": bool(endpoint and endpoint.startswith("http://")),
            },
            retry_config={
                "max_retries": max(0, settings.max_attempts - 1),
                "retry_timeout": timedelta(seconds=settings.request_timeout_s),
                "backoff": {"init_backoff": timedelta(milliseconds=50),
                            "max_backoff": timedelta(seconds=2), "base": 2},
            },
            credential_provider=_ChainCredentials(session),
            **kwargs,
        )

    def __repr__(self) -> str:
        # Only where it points: the credentials stay inside the provider.
        return f"ObstoreStore({self._where})"

    @property
    def client(self) -> S3Store:
        """The obstore ``S3Store`` every request goes through, for inspection
        (its resolved ``config``, its ``credential_provider``, whose repr hides
        the secret). Requests made on it directly bypass this class's error
        translation."""
        return self._store

    @classmethod
    async def open(cls, settings: StoreSettings) -> ObstoreStore:
        return cls(settings)

    async def close(self) -> None:
        return None

    async def put(self, key: str, data: Buffer, *, mode: PutMode = "overwrite") -> str | None:
        try:
            res = await obstore.put_async(self._store, key, data, mode=mode, use_multipart=False)
        except Exception as exc:
            raise _translate(exc, key) from None
        return res.get("e_tag")

    async def get(self, key: str) -> memoryview:
        try:
            res = await obstore.get_async(self._store, key)
            return memoryview(await res.bytes_async())
        except Exception as exc:
            raise _translate(exc, key) from None

    async def get_range(self, key: str, start: int, end: int) -> memoryview:
        if end <= start:
            return memoryview(b"")
        try:
            return memoryview(await obstore.get_range_async(self._store, key, start=start, end=end))
        except Exception as exc:
            raise _translate(exc, key) from None

    async def head(self, key: str) -> ObjectInfo:
        try:
            m = await obstore.head_async(self._store, key)
        except Exception as exc:
            raise _translate(exc, key) from None
        return ObjectInfo(m["path"], m["size"], m["last_modified"], m.get("e_tag"))

    async def list(self, prefix: str, *, page_size: int = 1000) -> AsyncIterator[ObjectPage]:
        stream = obstore.list(self._store, prefix, chunk_size=page_size)
        try:
            async for chunk in stream:
                yield [ObjectInfo(m["path"], m["size"], m["last_modified"], m.get("e_tag"))
                       for m in chunk]
        except StoreError:
            raise
        except Exception as exc:
            raise _translate(exc, prefix) from None

    async def list_dirs(self, prefix: str) -> builtins.list[str]:
        try:
            res = await obstore.list_with_delimiter_async(self._store, prefix)
        except Exception as exc:
            raise _translate(exc, prefix) from None
        return [p if p.endswith("/") else p + "/" for p in res["common_prefixes"]]

    async def delete_many(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), DELETE_BATCH):
            try:
                await obstore.delete_async(self._store, list(keys[i : i + DELETE_BATCH]))
            except oe.NotFoundError:
                continue
            except Exception as exc:
                raise _translate(exc, None) from None


def _custom_endpoint(url: str | None) -> bool:
    return bool(url) and not re.match(r"^https://s3[.\-]([a-z0-9\-]+\.)?amazonaws\.com", url or "")


__all__ = ["ObstoreStore"]
