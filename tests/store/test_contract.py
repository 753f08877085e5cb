"""The store contract: every backend behaves the same on the same requests.

One suite, parametrized over the in-memory store and both S3 backends; the S3
backends talk HTTP to moto, or to ``S3KV_TEST_ENDPOINT_URL`` when it is set.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import obstore
import pytest

from s3kv.errors import (
    AlreadyExists,
    ConditionalConflict,
    NoSuchBucket,
    NotFound,
    Unavailable,
)
from s3kv.store import MultipartAdmin, ObjectInfo, ObjectStore, open_store
from s3kv.store.s3_aioboto3 import Aioboto3Store
from tests.s3server import S3Endpoint
from tests.store.conftest import Backend, put_all

PATTERN = bytes(range(256))


def blob(n: int, salt: int = 0) -> bytes:
    """``n`` deterministic bytes, different for different ``salt``."""
    rep = bytes((b + salt) % 256 for b in PATTERN)
    return (rep * (n // 256 + 1))[:n]


async def seed(backend: Backend, store: ObjectStore, keys: Sequence[str]) -> None:
    """Create many empty objects; S3 buckets are seeded with obstore, the fastest writer."""
    if not backend.is_s3:
        await put_all(store, keys)
        return
    seeder = await open_store(backend.settings(backend="obstore"))
    try:
        await put_all(seeder, keys)
    finally:
        await seeder.close()


async def listed(store: ObjectStore, prefix: str, page_size: int = 1000) -> list[list[ObjectInfo]]:
    return [page async for page in store.list(prefix, page_size=page_size)]


# --- put / get -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "memoryview-slice"])
def test_put_get_round_trip(backend: Backend, kind: str) -> None:
    payload = blob(100_003, salt=7)
    data: Any
    if kind == "bytes":
        data = payload
    elif kind == "bytearray":
        data = bytearray(payload)
    elif kind == "memoryview":
        data = memoryview(bytearray(payload))
    else:  # a view into the middle of a bigger buffer: only its bytes are stored
        data = memoryview(b"HEAD" + payload + b"TAIL")[4:-4]

    async def body(store: ObjectStore) -> None:
        etag = await store.put("rt/obj", data)
        assert etag is None or isinstance(etag, str)
        got = await store.get("rt/obj")
        assert isinstance(got, memoryview)
        assert len(got) == len(payload)
        assert bytes(got) == payload
        info = await store.head("rt/obj")
        assert info.size == len(payload)

    backend.run(body)


def test_put_empty_object(backend: Backend) -> None:
    async def body(store: ObjectStore) -> None:
        await store.put("empty", b"")
        assert bytes(await store.get("empty")) == b""
        assert (await store.head("empty")).size == 0

    backend.run(body)


def test_create_twice_raises_already_exists_and_keeps_content(backend: Backend) -> None:
    async def body(store: ObjectStore) -> None:
        await store.put("c/once", b"first", mode="create")
        with pytest.raises(AlreadyExists) as info:
            await store.put("c/once", b"second", mode="create")
        assert info.value.key == "c/once"
        assert bytes(await store.get("c/once")) == b"first"

    backend.run(body)


def test_overwrite_replaces_content(backend: Backend) -> None:
    async def body(store: ObjectStore) -> None:
        await store.put("o/k", b"one", mode="create")
        await store.put("o/k", b"second value")
        assert bytes(await store.get("o/k")) == b"second value"
        assert (await store.head("o/k")).size == len(b"second value")
        await store.put("o/k", b"3", mode="overwrite")
        assert bytes(await store.get("o/k")) == b"3"

    backend.run(body)


def test_concurrent_create_has_exactly_one_winner(backend: Backend) -> None:
    n = 16
    contents = [blob(4096, salt=i) + f"writer-{i}".encode() for i in range(n)]

    async def body(store: ObjectStore) -> None:
        results = await asyncio.gather(
            *(store.put("race/key", c, mode="create") for c in contents),
            return_exceptions=True,
        )
        winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
        losers = [r for r in results if isinstance(r, BaseException)]
        unexpected = [r for r in losers if not isinstance(r, (AlreadyExists, ConditionalConflict))]
        assert unexpected == []
        assert len(winners) == 1, results
        assert len(losers) == n - 1
        assert bytes(await store.get("race/key")) == contents[winners[0]]

    backend.run(body)


# --- ranges, head, missing -------------------------------------------------------


def test_get_range_returns_exact_bytes(backend: Backend) -> None:
    size = 1 << 20 | 7
    payload = blob(size, salt=3)
    ranges = [(0, 1), (0, 64), (10, 20), (255, 257), (size // 2, size // 2 + 4096),
              (size - 1, size), (size - 100, size), (0, size)]

    async def body(store: ObjectStore) -> None:
        await store.put("r/obj", payload)
        for start, end in ranges:
            got = await store.get_range("r/obj", start, end)
            assert isinstance(got, memoryview)
            assert bytes(got) == payload[start:end], (start, end)
        assert bytes(await store.get_range("r/obj", size - 1, size)) == payload[-1:]

    backend.run(body)


def test_head_reports_size_and_time(backend: Backend) -> None:
    async def body(store: ObjectStore) -> None:
        await store.put("h/a", blob(12_345))
        info = await store.head("h/a")
        assert info.key == "h/a"
        assert info.size == 12_345
        assert isinstance(info.last_modified, datetime)
        assert info.last_modified.tzinfo is not None

    backend.run(body)


def test_missing_key_raises_not_found(backend: Backend) -> None:
    async def body(store: ObjectStore) -> None:
        await store.put("m/present", b"x")
        with pytest.raises(NotFound) as got:
            await store.get("m/absent")
        assert not isinstance(got.value, NoSuchBucket)
        with pytest.raises(NotFound):
            await store.head("m/absent")
        with pytest.raises(NotFound):
            await store.get_range("m/absent", 0, 1)

    backend.run(body)


# --- list ------------------------------------------------------------------------


# Listing prefixes end with "/": obstore lists by path segment, so a bare
# string prefix ("de") would not match "del/..." there as it does in S3.
LIST_INSIDE = [f"a/{i:05d}" for i in range(2500)] + ["a/sub/deeper/x"]
LIST_OUTSIDE = ["ab/x", "a", "b/a/1", "aa/0"]


@pytest.fixture(scope="module")
def listing_bucket(s3_endpoint: S3Endpoint) -> str:
    """One bucket seeded once with 2,500+ keys, only read by the listing tests."""
    bucket = s3_endpoint.new_bucket("list")
    Backend("obstore", s3_endpoint, bucket).run(
        lambda store: put_all(store, LIST_INSIDE + LIST_OUTSIDE)
    )
    return bucket


@pytest.mark.parametrize("page_size", [1000, 300])
def test_list_pages_every_key_once_and_only_under_prefix(
    backend: Backend, page_size: int, request: pytest.FixtureRequest
) -> None:
    if backend.is_s3:
        backend = backend.with_bucket(request.getfixturevalue("listing_bucket"))

    async def body(store: ObjectStore) -> None:
        if not backend.is_s3:
            await put_all(store, LIST_INSIDE + LIST_OUTSIDE)
        pages = await listed(store, "a/", page_size=page_size)
        sizes = [len(p) for p in pages]
        assert all(0 < s <= page_size for s in sizes), sizes
        assert len(pages) == -(-len(LIST_INSIDE) // page_size)
        keys = [o.key for p in pages for o in p]
        assert len(keys) == len(set(keys))
        assert sorted(keys) == sorted(LIST_INSIDE)
        assert all(o.size == 0 for p in pages for o in p)

    backend.run(body)


def test_list_reports_sizes_and_empty_prefix_yields_nothing(backend: Backend) -> None:
    async def body(store: ObjectStore) -> None:
        await store.put("ls/one", b"1")
        await store.put("ls/three", b"333")
        pages = await listed(store, "ls/")
        sizes = {o.key: o.size for p in pages for o in p}
        assert sizes == {"ls/one": 1, "ls/three": 3}
        assert all(o.last_modified.tzinfo is not None for p in pages for o in p)
        assert [o for p in await listed(store, "nothing-here/") for o in p] == []

    backend.run(body)


def test_list_dirs_returns_one_level(backend: Backend) -> None:
    async def body(store: ObjectStore) -> None:
        for key in ("d/x/1", "d/x/2", "d/y/deep/3", "d/z", "dz/w/1", "e/q/1"):
            await store.put(key, b"1")
        assert sorted(await store.list_dirs("d/")) == ["d/x/", "d/y/"]
        assert sorted(await store.list_dirs("d/y/")) == ["d/y/deep/"]
        assert await store.list_dirs("d/x/") == []
        assert await store.list_dirs("nothing/") == []

    backend.run(body)


# --- delete ----------------------------------------------------------------------


def _spy_delete_batches(backend: Backend, store: ObjectStore, monkeypatch: pytest.MonkeyPatch,
                        batches: list[int]) -> None:
    """Record the size of each delete request an S3 backend sends."""
    if backend.name == "obstore":
        real = obstore.delete_async

        async def spy(target: Any, paths: Any) -> Any:
            batches.append(len(paths) if isinstance(paths, list) else 1)
            return await real(target, paths)

        monkeypatch.setattr(obstore, "delete_async", spy)
    elif backend.name == "aioboto3":

        def on_delete(params: dict[str, Any], **_: Any) -> None:
            batches.append(len(params["Delete"]["Objects"]))

        assert isinstance(store, Aioboto3Store)
        store.client.meta.events.register("before-parameter-build.s3.DeleteObjects", on_delete)


def test_delete_many_in_batches_ignoring_missing(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"del/{i:05d}" for i in range(2500)]
    keep = ["del-keep/1", "de/l/2", "del"]
    missing = [f"del/missing-{i}" for i in range(5)]
    batches: list[int] = []

    async def body(store: ObjectStore) -> None:
        await seed(backend, store, keys + keep)
        _spy_delete_batches(backend, store, monkeypatch, batches)
        await store.delete_many(missing + keys)
        if backend.is_s3:
            assert sum(batches) == len(missing) + len(keys)
            assert max(batches) <= 1000
            assert len(batches) == 3
        assert [o for p in await listed(store, "del/") for o in p] == []
        for key in keep:
            assert (await store.head(key)).size == 0
        with pytest.raises(NotFound):
            await store.head("del/00000")
        await store.delete_many(missing)  # all missing: still fine
        await store.delete_many([])

    backend.run(body)


# --- errors ----------------------------------------------------------------------


def test_missing_bucket_raises_no_such_bucket(s3_backend: Backend) -> None:
    absent = s3_backend.with_bucket(f"s3kv-absent-{uuid.uuid4().hex[:12]}")

    async def body(store: ObjectStore) -> None:
        with pytest.raises(NoSuchBucket):
            await store.get("k")
        with pytest.raises(NoSuchBucket):
            await store.put("k", b"1")
        with pytest.raises(NoSuchBucket):
            await listed(store, "p/")
        with pytest.raises(NotFound):  # HEAD has no body to tell bucket from key
            await store.head("k")

    absent.run(body)


def test_unreachable_endpoint_raises_unavailable(s3_backend: Backend) -> None:
    name = s3_backend.name

    async def main() -> None:
        store = await open_store(
            s3_backend.settings(
                endpoint_url="http://127.0.0.1:1", max_attempts=1,
                connect_timeout_s=0.5, request_timeout_s=2.0, backend=name,
            )
        )
        try:
            with pytest.raises(Unavailable):
                await store.get("k")
            with pytest.raises(Unavailable):
                await store.put("k", b"1")
            with pytest.raises(Unavailable):
                await listed(store, "p/")
        finally:
            await store.close()

    asyncio.run(main())


def test_multipart_admin_on_aioboto3(s3_endpoint: S3Endpoint, bucket: str) -> None:
    s3_backend = Backend("aioboto3", s3_endpoint, bucket)
    client = s3_endpoint.client()  # type: ignore[no-untyped-call]
    up_a = client.create_multipart_upload(Bucket=bucket, Key="mp/a")["UploadId"]
    up_b = client.create_multipart_upload(Bucket=bucket, Key="other/b")["UploadId"]

    async def body(store: ObjectStore) -> None:
        assert isinstance(store, MultipartAdmin)
        ups = await store.list_multipart_uploads("mp/")
        assert [(u.key, u.upload_id) for u in ups] == [("mp/a", up_a)]
        assert isinstance(ups[0].initiated, datetime)
        everything = await store.list_multipart_uploads("")
        assert {(u.key, u.upload_id) for u in everything} == {("mp/a", up_a), ("other/b", up_b)}
        await store.abort_multipart_upload("mp/a", up_a)
        assert await store.list_multipart_uploads("mp/") == []
        remaining = await store.list_multipart_uploads("")
        assert [(u.key, u.upload_id) for u in remaining] == [("other/b", up_b)]
        with pytest.raises(NotFound):
            await store.abort_multipart_upload("mp/a", "no-such-upload-id")

    s3_backend.run(body)
    client.abort_multipart_upload(Bucket=bucket, Key="other/b", UploadId=up_b)


def test_backends_satisfy_the_protocols(backend: Backend) -> None:
    async def body(store: ObjectStore) -> None:
        assert isinstance(store, ObjectStore)
        assert store.bucket == (backend.bucket if backend.is_s3 else "memory")
        assert isinstance(store, MultipartAdmin) == (backend.name == "aioboto3")

    backend.run(body)
