"""The fault proxy itself: faithful forwarding, rule selection, and what each
action does on the wire, observed with plain HTTP clients."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from devtools.fault_proxy import (
    Blackhole,
    Delay,
    Drop,
    Error,
    FaultProxy,
    FlipBytes,
    Hold,
    InternalError,
    SlowDown,
    Truncate,
)
from tests.faults.conftest import Target
from tests.s3server import S3Endpoint


def client_via(proxy: FaultProxy, attempts: int = 1) -> Any:
    """A boto3 client through the proxy that never retries on its own."""
    return boto3.client(
        "s3", endpoint_url=proxy.url, region_name="us-east-1",
        config=Config(retries={"total_max_attempts": attempts, "mode": "standard"},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


def direct(endpoint: S3Endpoint) -> Any:
    """A boto3 client straight to moto."""
    return endpoint.client()  # type: ignore[no-untyped-call]


def raw_get(proxy: FaultProxy, bucket: str, key: str, timeout: float = 5.0) -> Any:
    """A presigned GET through the proxy with http.client: (connection, response)."""
    url = client_via(proxy).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=300
    )
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    conn.request("GET", f"{parts.path}?{parts.query}")
    return conn, conn.getresponse()


@pytest.fixture
def seeded(moto_endpoint: S3Endpoint, fault_bucket: str) -> bytes:
    """``obj`` (64 KiB of distinct bytes) in the bucket, written straight to moto."""
    data = os.urandom(64 * 1024)
    direct(moto_endpoint).put_object(Bucket=fault_bucket, Key="obj", Body=data)
    return data


# --- forwarding -------------------------------------------------------------------


def test_store_round_trip_through_proxy_is_byte_exact(target: Target) -> None:
    payload = os.urandom(8 << 20 | 13)

    async def body(store: Any) -> bytes:
        await store.put("big/obj", payload)
        return bytes(await store.get("big/obj"))

    assert target.run(body) == payload
    direct = target.upstream_client().get_object(Bucket=target.bucket, Key="big/obj")
    assert direct["Body"].read() == payload
    puts = [r for r in target.proxy.requests if r.method == "PUT"]
    assert [(r.body_bytes, r.status, r.fault) for r in puts] == [(len(payload), 200, None)]
    # The Host header the client signed is the one moto received.
    assert {r.host for r in target.proxy.requests} == {urlsplit(target.proxy.url).netloc}


def test_chunked_request_body_is_forwarded_whole(
    fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str
) -> None:
    pieces = [os.urandom(n) for n in (1, 65_536, 1_000_003, 17, 2_000_000)]
    parts = urlsplit(fault_proxy.url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    conn.request("PUT", f"/{fault_bucket}/chunked", body=iter(pieces), encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200
    got = direct(moto_endpoint).get_object(Bucket=fault_bucket, Key="chunked")["Body"].read()
    assert got == b"".join(pieces)
    assert fault_proxy.requests[-1].body_bytes == len(got)


def test_expect_100_continue_is_answered_before_the_body(
    fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str
) -> None:
    data = os.urandom(300_000)
    parts = urlsplit(fault_proxy.url)
    with socket.create_connection(("127.0.0.1", parts.port or 0), timeout=10) as sock:
        head = (f"PUT /{fault_bucket}/expect HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\n\r\n")
        sock.sendall(head.encode())
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 100")
        assert reader.readline() == b"\r\n"
        sock.sendall(data)
        assert reader.readline().split()[1] == b"200"
    got = direct(moto_endpoint).get_object(Bucket=fault_bucket, Key="expect")["Body"].read()
    assert got == data


# --- rule selection ---------------------------------------------------------------


def test_nth_and_times_select_which_matches_fire(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes
) -> None:
    s3 = client_via(fault_proxy)
    second = fault_proxy.add("GET", r"/obj$", SlowDown(), nth=2)
    codes = []
    for _ in range(4):
        try:
            s3.get_object(Bucket=fault_bucket, Key="obj")["Body"].read()
            codes.append("ok")
        except ClientError as exc:
            codes.append(exc.response["Error"]["Code"])
    assert codes == ["ok", "SlowDown", "ok", "ok"]
    assert (second.matched, second.injected) == (4, 1)

    fault_proxy.clear()
    twice = fault_proxy.add("HEAD", r"/obj$", InternalError(), times=2)
    statuses = []
    for _ in range(4):
        try:
            s3.head_object(Bucket=fault_bucket, Key="obj")
            statuses.append(200)
        except ClientError as exc:
            statuses.append(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    assert statuses == [500, 500, 200, 200]
    assert twice.injected == 2
    assert fault_proxy.faults == 1 + 2
    assert fault_proxy.count("GET", r"/obj$") == 4
    assert fault_proxy.count("HEAD") == 4


def test_trigger_arms_rules_from_its_request_on(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes
) -> None:
    s3 = client_via(fault_proxy)
    down = fault_proxy.trigger("HEAD", r"/obj$", nth=2)
    rule = fault_proxy.add(None, r"/obj$", SlowDown(), when=down)
    seen = []
    for call in ("get", "head", "get", "head", "get"):
        try:
            if call == "get":
                s3.get_object(Bucket=fault_bucket, Key="obj")["Body"].read()
            else:
                s3.head_object(Bucket=fault_bucket, Key="obj")
            seen.append("ok")
        except ClientError as exc:
            seen.append(str(exc.response["ResponseMetadata"]["HTTPStatusCode"]))
    # the second HEAD fires the trigger and is itself refused, as is all after it
    assert seen == ["ok", "ok", "ok", "503", "503"]
    assert down.fired and down.matched == 2 and down.event.is_set()
    assert (rule.matched, rule.injected) == (2, 2)


def test_answered_trigger_counts_only_acknowledged_requests(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes
) -> None:
    s3 = client_via(fault_proxy)
    acked = fault_proxy.trigger("PUT", r"/new$", nth=2, answered=True)
    arrived = fault_proxy.trigger("PUT", r"/new$", nth=2)
    fault_proxy.add("PUT", r"/new$", InternalError(), nth=1)  # the first PUT is refused
    with pytest.raises(ClientError):
        s3.put_object(Bucket=fault_bucket, Key="new", Body=b"1")
    s3.put_object(Bucket=fault_bucket, Key="new", Body=b"2")
    # two PUTs arrived, one was acknowledged
    assert arrived.fired and (acked.matched, acked.fired) == (1, False)
    after = fault_proxy.add(None, r"/new$", SlowDown(), when=acked)
    s3.put_object(Bucket=fault_bucket, Key="new", Body=b"3")  # the second acknowledged PUT
    assert acked.fired and acked.event.is_set() and after.injected == 0
    with pytest.raises(ClientError):
        s3.get_object(Bucket=fault_bucket, Key="new")
    assert after.injected == 1


def test_hold_answers_only_once_its_gate_opens(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes
) -> None:
    s3 = client_via(fault_proxy)
    opened = fault_proxy.trigger("HEAD", r"/obj$")
    fault_proxy.add("GET", r"/obj$", Hold(opened.event))
    got: list[bytes] = []
    reader = threading.Thread(
        target=lambda: got.append(s3.get_object(Bucket=fault_bucket, Key="obj")["Body"].read()))
    reader.start()
    assert fault_proxy.wait_for_requests(1, "GET", r"/obj$")
    held = next(r for r in fault_proxy.requests if r.method == "GET")
    assert held.status is None and got == []  # arrived, not answered
    s3.head_object(Bucket=fault_bucket, Key="obj")
    reader.join(timeout=10)
    assert got == [seeded] and held.status == 200


def test_method_and_path_must_both_match(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes
) -> None:
    s3 = client_via(fault_proxy)
    rule = fault_proxy.add("PUT", r"/obj$", SlowDown())
    assert s3.get_object(Bucket=fault_bucket, Key="obj")["Body"].read() == seeded
    s3.put_object(Bucket=fault_bucket, Key="obj-2", Body=b"x")
    with pytest.raises(ClientError):
        s3.put_object(Bucket=fault_bucket, Key="obj", Body=b"x")
    assert (rule.matched, rule.injected) == (1, 1)


def test_probability_is_reproducible_with_a_seed(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes
) -> None:
    s3 = client_via(fault_proxy)

    def pattern(seed: int) -> list[bool]:
        fault_proxy.clear()
        fault_proxy.add("HEAD", r"/obj$", SlowDown(), probability=0.5, seed=seed)
        out = []
        for _ in range(24):
            try:
                s3.head_object(Bucket=fault_bucket, Key="obj")
                out.append(False)
            except ClientError:
                out.append(True)
        return out

    first, again, other = pattern(7), pattern(7), pattern(8)
    assert first == again
    assert 0 < sum(first) < len(first)
    assert first != other


# --- actions on the wire ----------------------------------------------------------


@pytest.mark.parametrize(("action", "status", "code"), [
    (SlowDown(), 503, "SlowDown"),
    (InternalError(), 500, "InternalError"),
    (Error(403, "AccessDenied", "nope"), 403, "AccessDenied"),
], ids=["503", "500", "403"])
def test_error_is_a_parseable_s3_error(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes, action: Error, status: int,
    code: str,
) -> None:
    fault_proxy.add("GET", r"/obj$", action)
    with pytest.raises(ClientError) as info:
        client_via(fault_proxy).get_object(Bucket=fault_bucket, Key="obj")
    assert info.value.response["Error"]["Code"] == code
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert fault_proxy.requests[-1].status == status
    conn, resp = raw_get(fault_proxy, fault_bucket, "obj")
    body = resp.read()
    conn.close()
    assert resp.status == status
    assert f"<Error><Code>{code}</Code>".encode() in body
    assert int(resp.getheader("Content-Length")) == len(body)


def test_truncate_sends_fewer_bytes_than_content_length(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes
) -> None:
    fault_proxy.add("GET", r"/obj$", Truncate(keep=1000))
    conn, resp = raw_get(fault_proxy, fault_bucket, "obj")
    assert int(resp.getheader("Content-Length")) == len(seeded)
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    conn.close()
    assert info.value.partial == seeded[:1000]


def test_flip_inverts_exactly_the_chosen_bytes(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes
) -> None:
    fault_proxy.add("GET", r"/obj$", FlipBytes(offsets=(0, -1)), nth=1)
    fault_proxy.add("GET", r"/obj$", FlipBytes(), nth=2)
    for flipped in ((0, len(seeded) - 1), (len(seeded) // 2,)):
        conn, resp = raw_get(fault_proxy, fault_bucket, "obj")
        body = resp.read()
        conn.close()
        assert len(body) == len(seeded)
        diff = [i for i in range(len(body)) if body[i] != seeded[i]]
        assert tuple(diff) == flipped
        assert all(body[i] == seeded[i] ^ 0xFF for i in diff)


@pytest.mark.parametrize("action", [Drop(), Drop(reset=True), Drop(after_upstream=True)],
                         ids=["fin", "rst", "after-upstream"])
def test_drop_closes_without_a_response(
    fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str, action: Drop
) -> None:
    fault_proxy.add("PUT", r"/dropped$", action)
    with pytest.raises((HTTPClientError, BotoConnectionError)):  # no HTTP response at all
        client_via(fault_proxy).put_object(Bucket=fault_bucket, Key="dropped", Body=b"v")
    assert fault_proxy.requests[-1].status is None
    listed = direct(moto_endpoint).list_objects_v2(Bucket=fault_bucket).get("Contents", [])
    # after_upstream: the server applied the request; only its answer was lost.
    assert [o["Key"] for o in listed] == (["dropped"] if action.after_upstream else [])


def test_delay_holds_the_request(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes
) -> None:
    fault_proxy.add("GET", r"/obj$", Delay(400))
    t0 = time.monotonic()
    conn, resp = raw_get(fault_proxy, fault_bucket, "obj")
    assert resp.read() == seeded
    conn.close()
    assert time.monotonic() - t0 >= 0.4
    assert fault_proxy.requests[-1].fault == "delay"


def test_blackhole_never_answers_until_the_proxy_stops(
    fault_proxy: FaultProxy, fault_bucket: str, seeded: bytes
) -> None:
    fault_proxy.add(None, r"", Blackhole())
    parts = urlsplit(fault_proxy.url)
    sock = socket.create_connection(("127.0.0.1", parts.port or 0), timeout=0.5)
    try:
        sock.sendall(f"GET /{fault_bucket}/obj HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        assert fault_proxy.wait_for_requests(1, "GET")  # it arrived and is being held
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert fault_proxy.requests[-1].status is None
        sock.settimeout(5)
        fault_proxy.stop()
        assert sock.recv(1) == b""  # released: closed, still without an answer
    finally:
        sock.close()
