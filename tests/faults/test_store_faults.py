"""Both S3 backends against a misbehaving endpoint: retries that recover,
failures that end cleanly as s3kv errors within bounded time."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from devtools.fault_proxy import Action, Blackhole, Delay, Drop, InternalError, SlowDown, Truncate
from s3kv.errors import AlreadyExists, StoreError, Throttled, Unavailable
from s3kv.store import ObjectStore
from tests.faults.conftest import Target

# botocore's standard-mode backoff before attempt n+1 is at most 2**(n-1) s.
MAX_BACKOFF_3_ATTEMPTS = 1 + 2


def timed(target: Target, body: Callable[[ObjectStore], Awaitable[Any]],
          **settings: Any) -> tuple[Any, float]:
    """(result or raised StoreError, seconds) of one operation through the proxy."""

    async def run(store: ObjectStore) -> tuple[Any, float]:
        t0 = time.monotonic()
        try:
            result = await body(store)
        except StoreError as exc:
            result = exc
        return result, time.monotonic() - t0

    return target.run(run, **settings)


# --- throttling and server errors -------------------------------------------------


def test_slowdown_burst_on_put_is_retried_and_succeeds(target: Target) -> None:
    data = os.urandom(256 * 1024)
    rule = target.proxy.add("PUT", r"/burst/k$", SlowDown(), times=2)
    result, elapsed = timed(target, lambda s: s.put("burst/k", data), max_attempts=3)
    assert not isinstance(result, BaseException), result
    assert rule.injected == 2
    assert target.proxy.count("PUT", r"/burst/k$") == 3
    body = target.upstream_client().get_object(Bucket=target.bucket, Key="burst/k")["Body"]
    assert body.read() == data
    assert elapsed < MAX_BACKOFF_3_ATTEMPTS + 5


@pytest.mark.parametrize(("action", "expected"), [
    (SlowDown(), Throttled), (InternalError(), Unavailable),
], ids=["503-slowdown", "500-internal"])
@pytest.mark.parametrize("mode", ["overwrite", "create"])
def test_error_storm_on_put_fails_cleanly_after_max_attempts(
    target: Target, action: Action, expected: type[StoreError], mode: str
) -> None:
    rule = target.proxy.add("PUT", r"/storm/k$", action)
    result, elapsed = timed(
        target, lambda s: s.put("storm/k", b"payload", mode=mode),  # type: ignore[arg-type]
        max_attempts=3,
    )
    assert isinstance(result, expected), result
    assert not isinstance(result, AlreadyExists)
    assert result.key == "storm/k"
    assert rule.injected == target.proxy.count("PUT", r"/storm/k$") == 3
    assert target.upstream_keys("storm/") == []
    assert elapsed < MAX_BACKOFF_3_ATTEMPTS + 5


def test_slowdown_storm_on_get_raises_throttled(target: Target) -> None:
    target.upstream_client().put_object(Bucket=target.bucket, Key="g/k", Body=b"v")
    target.proxy.add("GET", r"/g/k$", SlowDown())
    result, _ = timed(target, lambda s: s.get("g/k"), max_attempts=2)
    assert isinstance(result, Throttled), result
    assert target.proxy.count("GET", r"/g/k$") == 2


# --- connections dropped, bodies cut short --------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_dropped_connections_on_every_get_raise_unavailable(target: Target, reset: bool) -> None:
    target.upstream_client().put_object(Bucket=target.bucket, Key="d/k", Body=b"v")
    target.proxy.add("GET", r"/d/k$", Drop(reset=reset))
    result, elapsed = timed(target, lambda s: s.get("d/k"), max_attempts=3)
    assert isinstance(result, Unavailable), result
    # aiohttp itself resends an idempotent request once on a closed connection.
    assert 3 <= target.proxy.count("GET", r"/d/k$") <= 6
    assert elapsed < MAX_BACKOFF_3_ATTEMPTS + 5


def test_one_dropped_connection_is_retried(target: Target) -> None:
    data = os.urandom(100_000)
    target.upstream_client().put_object(Bucket=target.bucket, Key="d1/k", Body=data)
    rule = target.proxy.add("GET", r"/d1/k$", Drop(), nth=1)
    result, _ = timed(target, lambda s: s.get("d1/k"))
    assert bytes(result) == data
    assert rule.injected == 1


def test_truncated_body_on_every_get_never_returns_data(target: Target) -> None:
    data = os.urandom(300_000)
    target.upstream_client().put_object(Bucket=target.bucket, Key="t/k", Body=data)
    target.proxy.add("GET", r"/t/k$", Truncate())
    result, elapsed = timed(target, lambda s: s.get("t/k"))
    assert isinstance(result, StoreError), type(result)
    assert elapsed < MAX_BACKOFF_3_ATTEMPTS + 5


def test_truncated_body_once_is_an_error_or_the_whole_object(target: Target) -> None:
    """A client may resume or retry a cut body; it must never hand back a short one."""
    data = os.urandom(300_000)
    target.upstream_client().put_object(Bucket=target.bucket, Key="t1/k", Body=data)
    target.proxy.add("GET", r"/t1/k$", Truncate(), nth=1)
    result, _ = timed(target, lambda s: s.get("t1/k"))
    if not isinstance(result, StoreError):
        assert bytes(result) == data


# --- an endpoint that never answers ---------------------------------------------------


OPS: dict[str, Callable[[ObjectStore], Awaitable[Any]]] = {
    "get": lambda s: s.get("bh/k"),
    "put": lambda s: s.put("bh/k", b"v" * 1000),
    "head": lambda s: s.head("bh/k"),
    "list": lambda s: anext(aiter(s.list("bh/"))),
    "delete": lambda s: s.delete_many(["bh/k"]),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_blackholed_endpoint_raises_unavailable_within_request_timeout(
    target: Target, op: str
) -> None:
    timeout = 1.0
    target.proxy.add(None, r"", Blackhole())
    result, elapsed = timed(target, OPS[op], max_attempts=1, request_timeout_s=timeout)
    assert isinstance(result, Unavailable), result
    assert target.proxy.count() == 1
    assert 0.9 * timeout <= elapsed < timeout + 1.5


def test_blackholed_endpoint_with_retries_stays_bounded(target: Target) -> None:
    timeout, attempts = 1.0, 3
    target.proxy.add(None, r"", Blackhole())
    result, elapsed = timed(
        target, OPS["get"], max_attempts=attempts, request_timeout_s=timeout
    )
    assert isinstance(result, Unavailable), result
    assert 1 <= target.proxy.count() <= attempts
    assert elapsed < attempts * timeout + MAX_BACKOFF_3_ATTEMPTS + 1.5


def test_delay_within_the_timeout_succeeds_and_beyond_it_fails(target: Target) -> None:
    target.upstream_client().put_object(Bucket=target.bucket, Key="dl/k", Body=b"value")
    target.proxy.add("GET", r"/dl/k$", Delay(200), nth=1)
    target.proxy.add("GET", r"/dl/k$", Delay(3000), nth=2)
    result, elapsed = timed(target, lambda s: s.get("dl/k"), max_attempts=1,
                            request_timeout_s=1.5)
    assert bytes(result) == b"value"
    assert elapsed >= 0.2
    result, elapsed = timed(target, lambda s: s.get("dl/k"), max_attempts=1,
                            request_timeout_s=1.5)
    assert isinstance(result, Unavailable), result
    assert elapsed < 1.5 + 1.5
