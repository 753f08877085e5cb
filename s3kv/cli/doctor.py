"""``s3kv doctor``: can this machine run the connector against this bucket?

Each check is one line, ok or FAIL with the reason, in the order a person
would debug: settings, credentials, network, bucket, then the operations
the connector performs, on a scratch key under the prefix. Conditional
writes get their own check because several S3-compatible servers accept
``If-None-Match`` and ignore it, and commits rely on it to never overwrite
a manifest (shard keys are unique per save round, so for shards it only
catches bugs). Clock skew matters because GC ages objects by the server's
Last-Modified against the local clock.
"""

from __future__ import annotations

import contextlib
import http.client
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Literal

import boto3
import typer

from s3kv.cli.common import (
    BackendOpt,
    BucketOpt,
    Conn,
    EndpointOpt,
    ExitCode,
    FormatOpt,
    OutputFormat,
    PrefixOpt,
    RegionOpt,
    connection,
    echo,
    emit_json,
    multipart_admin,
    one_line,
    run,
)
from s3kv.errors import (
    AccessDenied,
    AlreadyExists,
    ConfigError,
    NoSuchBucket,
    NotFound,
)
from s3kv.store import ObjectStore, open_store

Status = Literal["ok", "FAIL", "warn", "skip"]
#: Beyond this, GC ages and grace periods are off by more than a rounding error.
MAX_SKEW_S = 60.0


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    # A failure that means "fix your configuration or credentials" (exit 3).
    config: bool = False


def register(app: typer.Typer) -> None:
    app.command("doctor", help="Check settings, credentials, bucket and S3 semantics.")(doctor)


class Doctor:
    def __init__(self, emit: bool) -> None:
        self.checks: list[Check] = []
        self._emit = emit

    def add(self, name: str, status: Status, detail: str, *, config: bool = False) -> Check:
        check = Check(name, status, detail, config)
        self.checks.append(check)
        if self._emit:
            echo(f"{status:<4}  {name:<12}  {detail}")
        return check

    def fail(self, name: str, exc: BaseException) -> Check:
        config = isinstance(exc, (AccessDenied, NoSuchBucket, ConfigError))
        if isinstance(exc, NoSuchBucket):
            return self.add(name, "FAIL", "NoSuchBucket: the bucket does not exist", config=True)
        return self.add(name, "FAIL", f"{type(exc).__name__}: {one_line(str(exc))}",
                        config=config)

    @property
    def failed(self) -> bool:
        return any(c.status == "FAIL" for c in self.checks)


def doctor(
    fmt: FormatOpt = OutputFormat.table,
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    backend: BackendOpt = None,
) -> None:
    doc = Doctor(emit=fmt is OutputFormat.table)
    try:
        _diagnose(doc, bucket, prefix, endpoint_url, region, backend)
    except KeyboardInterrupt:
        typer.echo("s3kv doctor: interrupted", err=True)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    if fmt is OutputFormat.json:
        emit_json({
            "ok": not doc.failed,
            "checks": [{"name": c.name, "status": c.status, "detail": c.detail}
                       for c in doc.checks],
        })
    if doc.failed:
        config = any(c.config for c in doc.checks if c.status == "FAIL")
        raise typer.Exit(ExitCode.CONFIG if config else ExitCode.FAILURE)


def _diagnose(doc: Doctor, bucket: str | None, prefix: str | None, endpoint_url: str | None,
              region: str | None, backend: str | None) -> None:
    try:
        conn = connection(bucket, prefix, endpoint_url, region, backend)
    except ConfigError as exc:
        doc.add("config", "FAIL", str(exc), config=True)
        return
    store = conn.settings.store
    doc.add("config", "ok", f"s3://{store.bucket}/{store.prefix}/ via {store.backend}")
    session = boto3.session.Session(region_name=store.region)
    creds = session.get_credentials()
    if creds is None:
        doc.add("credentials", "FAIL", "the AWS chain found none (environment, shared "
                "credentials/config files, SSO, container or instance role)", config=True)
        return
    doc.add("credentials", "ok", f"resolved by the AWS chain ({creds.method})")
    client = session.client("s3", endpoint_url=store.endpoint_url)
    endpoint = str(client.meta.endpoint_url)
    if not _probe_endpoint(doc, endpoint, max(store.connect_timeout_s, 5.0)):
        return
    run(lambda: _store_checks(doc, conn))


def _probe_endpoint(doc: Doctor, endpoint: str, timeout: float) -> bool:
    url = urllib.parse.urlsplit(endpoint)
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = cls(url.hostname or "", url.port, timeout=timeout)
    try:
        conn.request("HEAD", "/")
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        doc.add("endpoint", "FAIL",
                f"{endpoint} unreachable: {type(exc).__name__}: {one_line(str(exc))}")
        return False
    finally:
        conn.close()
    doc.add("endpoint", "ok", f"{endpoint} answers (HTTP {status})")
    return True


async def _store_checks(doc: Doctor, conn: Conn) -> None:
    try:
        store = await open_store(conn.settings.store)
    except Exception as exc:
        doc.fail("client", exc)
        return
    key = f"{conn.prefix}/_doctor/{uuid.uuid4().hex}"
    try:
        await _with_store(doc, conn, store, key)
    finally:
        with contextlib.suppress(Exception):
            await store.delete_many([key])
        await store.close()


async def _with_store(doc: Doctor, conn: Conn, store: ObjectStore, key: str) -> None:
    try:
        await store.list_dirs(conn.layout.root())
    except Exception as exc:
        doc.fail("bucket", exc)
        return
    doc.add("bucket", "ok", f"{conn.bucket} exists and can be listed")
    body = uuid.uuid4().bytes * 64
    t0 = time.time()
    try:
        await store.put(key, body, mode="create")
    except Exception as exc:
        doc.fail("put", exc)
        return
    local_mid = (t0 + time.time()) / 2
    doc.add("put", "ok", f"wrote scratch object {key}")
    try:
        got = await store.get(key)
        if bytes(got) != body:
            doc.add("get", "FAIL", f"read back {len(got)} bytes that differ from what was written")
        else:
            doc.add("get", "ok", "read back the same bytes")
    except Exception as exc:
        doc.fail("get", exc)
    try:
        listed = [o.key async for page in store.list(key.rsplit("/", 1)[0] + "/") for o in page]
        if key in listed:
            doc.add("list", "ok", "scratch object is listed")
        else:
            doc.add("list", "FAIL", "scratch object missing from the listing")
    except Exception as exc:
        doc.fail("list", exc)
    try:
        await store.put(key, b"second", mode="create")
    except AlreadyExists:
        doc.add("conditional", "ok", "a second If-None-Match PUT was refused (412)")
    except Exception as exc:
        doc.fail("conditional", exc)
    else:
        doc.add("conditional", "FAIL", "a second If-None-Match PUT succeeded: the server "
                "ignores conditional writes, so concurrent commits could overwrite manifests")
    try:
        info = await store.head(key)
        skew = info.last_modified.timestamp() - local_mid
        # Last-Modified has one-second resolution.
        if abs(skew) > MAX_SKEW_S:
            doc.add("clock", "warn", f"local clock is {-skew:+.0f} s off the server's "
                    f"(over {MAX_SKEW_S:.0f} s): GC ages and grace periods shift by that much")
        else:
            doc.add("clock", "ok", f"skew {skew:+.1f} s against the server's Last-Modified")
    except Exception as exc:
        doc.fail("clock", exc)
    try:
        await store.delete_many([key])
        try:
            await store.get(key)
        except NotFound:
            doc.add("delete", "ok", "scratch object deleted")
        else:
            doc.add("delete", "FAIL", "scratch object still readable after delete")
    except Exception as exc:
        doc.fail("delete", exc)
    await _multipart(doc, conn, store)


async def _multipart(doc: Doctor, conn: Conn, store: ObjectStore) -> None:
    """GC aborts stale multipart uploads; a policy without the permission only warns."""
    try:
        async with multipart_admin(conn, store) as admin:
            uploads = await admin.list_multipart_uploads(conn.layout.root())
        doc.add("uploads", "ok", f"multipart uploads can be listed ({len(uploads)} open)")
    except Exception as exc:
        doc.add("uploads", "warn", f"cannot list multipart uploads, gc will not abort stale "
                f"ones: {type(exc).__name__}: {one_line(str(exc))}")
