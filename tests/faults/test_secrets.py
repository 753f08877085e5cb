"""The secret key never shows up in logs, errors, events or reprs, even at
DEBUG level and on failing requests."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import boto3
import pytest
from obstore.auth.boto3 import Boto3CredentialProvider

from devtools.fault_proxy import Drop, FaultProxy, InternalError, SlowDown, Truncate
from s3kv.aio import LoopThread
from s3kv.commit import Committer, LocalGatherer
from s3kv.config import Settings, parse_settings, settings_to_mapping
from s3kv.errors import NotFound
from s3kv.lookup import find_committed_prefix
from s3kv.store import ObjectStore, open_store
from s3kv.store.s3_aioboto3 import Aioboto3Store
from s3kv.store.s3_obstore import ObstoreStore
from tests.faults.conftest import Target
from tests.faults.test_core_faults import (
    CHUNK_IDS,
    RIG_HEADS,
    WRITER,
    Rig,
    big_chunk,
    read_rank0,
    seed_chunk,
)
from tests.s3server import S3Endpoint
from tests.unit.builders import LAYOUT, NS

SECRET = "S3KVs3cr3t-Do-Not-Log-7f3a9c2e41b8d6"
ACCESS = "AKIAS3KVFAULTTEST01"
LOGGERS = ("s3kv", "botocore", "aiobotocore", "boto3", "aiohttp", "urllib3", "asyncio")


def record_text(rec: logging.LogRecord) -> str:
    """Everything a handler could print for a record, and then some."""
    parts = [logging.Formatter("%(name)s %(levelname)s %(message)s").format(rec),
             repr(rec.args), repr(rec.__dict__)]
    if rec.exc_info and rec.exc_info[1] is not None:
        parts.append(logging.Formatter().formatException(rec.exc_info))
    return "\n".join(parts)


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # The environment is what the standard chain resolves: the check below can fail.
    creds = boto3.session.Session().get_credentials()
    assert creds is not None
    assert creds.secret_key == SECRET


def test_secret_absent_from_logs_errors_and_reprs(
    target: Target, secret_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    chunk = big_chunk()
    seed_chunk(target, chunk)
    settings = target.settings(max_attempts=2, request_timeout_s=2.0)
    errors: list[BaseException] = []
    reprs: list[str] = [repr(settings), repr(Settings(store=settings)),
                        repr(settings_to_mapping(parse_settings({"bucket": target.bucket})))]

    async def failing_requests(store: ObjectStore) -> None:
        reprs.extend([repr(store), repr(vars(store))])
        if isinstance(store, ObstoreStore):  # the client and its configuration
            client = store.client
            reprs.extend([repr(client), repr(client.config), repr(client.credential_provider)])
        else:
            assert isinstance(store, Aioboto3Store)
            reprs.append(repr(store.client))
        await store.put("ok/k", b"fine")
        assert bytes(await store.get("ok/k")) == b"fine"
        target.proxy.add("PUT", r"/storm/k$", SlowDown())
        target.proxy.add("GET", r"/gone/k$", InternalError())
        target.proxy.add("GET", chunk.manifest.shard_for_rank(0).key + "$", Truncate())
        target.proxy.add("GET", r"/manifest\.json$", Drop())
        attempts: list[Any] = [
            store.put("storm/k", b"x"),
            store.get("gone/k"),
            store.get("absent/k"),
            store.head("absent/k"),
            read_rank0(store, chunk),
            find_committed_prefix(store, LAYOUT, NS, [chunk.manifest.chunk_id]),
        ]
        for coro in attempts:
            try:
                await coro
            except Exception as exc:  # every one of these must fail
                errors.append(exc)
            else:
                pytest.fail(f"{coro!r} did not fail")

    target.run(failing_requests, max_attempts=2, request_timeout_s=2.0)

    # A commit whose manifest write fails logs a warning with the store's error.
    target.proxy.clear()
    target.proxy.add("PUT", r"/manifest\.json$", InternalError())
    io = LoopThread("secret-commit-io")
    store = io.run(open_store(replace(settings, max_attempts=1)))
    events: list[tuple[str, dict[str, Any]]] = []
    committer = Committer(
        io=io, store=store, layout=LAYOUT, namespace=NS, writer_id=WRITER,
        gatherer=LocalGatherer(), max_inflight_bytes=16 << 20, num_heads=RIG_HEADS,
        on_event=lambda name, info: events.append((name, dict(info))),
    )
    try:
        rig = Rig(io, store, committer, events)
        rig.commit(1)
        assert rig.counter("commit_failures") == 1
    finally:
        committer.close()
        io.run(store.close())
        io.stop()

    assert len(errors) == 6
    assert any(isinstance(e, NotFound) for e in errors)
    logged = [record_text(r) for r in caplog.records]
    names = {r.name.split(".")[0] for r in caplog.records}
    assert "s3kv" in names  # the commit warning was captured
    if target.backend == "aioboto3":  # botocore logs requests and signing at DEBUG
        assert "botocore" in names
        assert any("Authorization" in t or "Signature" in t for t in logged)
    texts = logged + reprs + [repr(e) for e in errors] + [str(e) for e in errors]
    texts += [repr(events), repr(CHUNK_IDS)]
    leaks = [t[:200] for t in texts if SECRET in t]
    assert leaks == []
    # Not even a recognisable fragment of it.
    assert not any(SECRET[8:24] in t for t in texts)


def test_obstore_credential_provider_repr_hides_the_secret(
    fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str, secret_env: None
) -> None:
    """obstore is fed by s3kv's own wrapper around the boto3 credential chain."""
    target = Target("obstore", fault_proxy, moto_endpoint, fault_bucket)

    async def body(store: ObjectStore) -> None:
        assert isinstance(store, ObstoreStore)
        provider = store.client.credential_provider
        assert isinstance(provider, Boto3CredentialProvider)  # s3kv's chain, not obstore's own
        assert provider()["secret_access_key"] == SECRET  # it does hold the secret
        assert SECRET not in repr(provider)
        assert SECRET not in str(provider)
        assert SECRET not in repr(store.client)

    target.run(body)
