"""Every decoder of bucket documents rejects hostile input with its own error.

Anyone with write access to the bucket can put any bytes under any key. The
engine, ``ls``, ``gc`` and ``verify`` catch the decoders' own error types
(``ManifestError``, ``IntegrityError``), so any other exception (a
``RecursionError`` from deep nesting, an ``OverflowError`` from ``Infinity``
where an int belongs) would stop a tool. Hypothesis drives each decoder with
arbitrary bytes, arbitrary JSON, and valid documents with one field replaced
by an arbitrary JSON value; its per-example deadline bounds the cost.

The catalog's records (what ``ls``, ``du`` and ``gc`` keep per chunk) come
from a listing and the chunk's manifest: they are driven the same way through
:meth:`Catalog.records`, with hostile manifests and hostile keys in the listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.memory_store import MemoryStore
from s3kv.catalog import Catalog
from s3kv.errors import IntegrityError, ManifestError
from s3kv.inventory import ChunkRecord, ScannedChunk
from s3kv.jsondoc import loads_strict
from s3kv.manifest import MAX_MANIFEST_BYTES, decode_manifest
from s3kv.shard import MAGIC, SHARD_VERSION, ShardSpec, allocate, parse_header
from tests.unit.builders import CIDS, LAYOUT, NS, PAYLOAD, build_chunk

MANIFEST_DOC: dict[str, Any] = json.loads(build_chunk(index=1, tp=2).manifest.encode())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)
HOSTILE_NUMBERS = [b"Infinity", b"-Infinity", b"NaN", b"1e400", b"-1e400", b"9" * 5000]


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def decode(data: bytes) -> None:
    decode_manifest(data, layout=LAYOUT)


def header_bytes(doc_bytes: bytes) -> bytes:
    return struct.pack("<8sHI", MAGIC, SHARD_VERSION, len(doc_bytes)) + doc_bytes


def header_doc() -> dict[str, Any]:
    buf, _ = allocate(ShardSpec(CIDS[0], 0, 0, 2, PAYLOAD))
    raw = bytes(buf)
    n = struct.unpack_from("<I", raw, 10)[0]
    parsed: dict[str, Any] = json.loads(raw[14: 14 + n])
    return parsed


# --- the strict parser -----------------------------------------------------------


@pytest.mark.parametrize("bad", [*HOSTILE_NUMBERS[:5], nested(100000)])
def test_strict_json_refuses_what_no_writer_produces(bad: bytes) -> None:
    with pytest.raises(ValueError):
        loads_strict(b'{"x": ' + bad + b"}" if not bad.startswith(b"[") else bad)


def test_strict_json_reads_ordinary_documents() -> None:
    assert loads_strict(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}


# --- manifests -------------------------------------------------------------------


def test_deeply_nested_manifest_under_the_size_cap_is_a_manifest_error() -> None:
    data = nested(60_000)
    assert len(data) <= MAX_MANIFEST_BYTES
    with pytest.raises(ManifestError, match="nested"):
        decode(data)


@pytest.mark.parametrize("number", HOSTILE_NUMBERS)
@pytest.mark.parametrize("field", ["chunk_index", "num_tokens", "tp_size"])
def test_hostile_numbers_in_a_manifest_are_manifest_errors(field: str, number: bytes) -> None:
    doc = dict(MANIFEST_DOC, **{field: "__HOLE__"})
    data = json.dumps(doc).encode().replace(b'"__HOLE__"', number)
    with pytest.raises(ManifestError):
        decode(data)


@settings(max_examples=300, deadline=500)
@given(st.binary(max_size=512))
def test_manifest_decoder_on_arbitrary_bytes(data: bytes) -> None:
    with pytest.raises(ManifestError):
        decode(data)


@settings(max_examples=300, deadline=500)
@given(st.sampled_from(sorted(MANIFEST_DOC)), json_values)
def test_manifest_decoder_with_one_field_replaced(field: str, value: Any) -> None:
    doc = dict(MANIFEST_DOC, **{field: value})
    with contextlib.suppress(ManifestError):
        decode(json.dumps(doc).encode())


@settings(max_examples=200, deadline=500)
@given(st.integers(0, 1), st.sampled_from(["key", "size", "checksum", "heads", "rank",
                                            "payload_offset", "head_checksums", "starts"]),
       json_values)
def test_manifest_decoder_with_one_shard_field_replaced(shard: int, field: str,
                                                         value: Any) -> None:
    doc = json.loads(json.dumps(MANIFEST_DOC))
    doc["shards"][shard][field] = value
    with contextlib.suppress(ManifestError):
        decode(json.dumps(doc).encode())


# --- shard headers ---------------------------------------------------------------


@pytest.mark.parametrize("number", HOSTILE_NUMBERS)
@pytest.mark.parametrize("field", ["tokens", "rank", "token_elems"])
def test_hostile_numbers_in_a_shard_header_are_integrity_errors(field: str,
                                                                number: bytes) -> None:
    doc = dict(header_doc(), **{field: "__HOLE__"})
    data = json.dumps(doc).encode().replace(b'"__HOLE__"', number)
    with pytest.raises(IntegrityError):
        parse_header(header_bytes(data))


def test_deeply_nested_shard_header_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError):
        parse_header(header_bytes(nested(60_000)))


@settings(max_examples=300, deadline=500)
@given(st.binary(max_size=512))
def test_shard_header_on_arbitrary_bytes(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        parse_header(data)


@settings(max_examples=300, deadline=500)
@given(st.sampled_from(sorted(header_doc())), json_values)
def test_shard_header_with_one_field_replaced(field: str, value: Any) -> None:
    doc = dict(header_doc(), **{field: value})
    with contextlib.suppress(IntegrityError):
        parse_header(header_bytes(json.dumps(doc).encode()))


def test_a_valid_shard_header_still_parses() -> None:
    spec, offset = parse_header(header_bytes(json.dumps(header_doc()).encode()))
    assert spec.chunk_id == CIDS[0] and spec.layout == PAYLOAD and offset % 64 == 0


# --- namespace documents -----------------------------------------------------------


@settings(max_examples=100, deadline=1000)
@given(st.one_of(st.binary(max_size=256), st.sampled_from(
    [nested(60_000), b'{"fingerprint": {"num_layers": Infinity}}',
     b'{"fingerprint": {"x": 1e400}}'])))
def test_a_hostile_namespace_document_is_ignored(data: bytes) -> None:
    store = MemoryStore()
    asyncio.run(store.put(LAYOUT.namespace_doc(NS), data))
    got = asyncio.run(Catalog(store, LAYOUT).fingerprint(NS))
    assert got is None or isinstance(got, dict)


# --- catalog records ---------------------------------------------------------------

CHUNK = build_chunk(index=1, tp=2)
CHUNK_ID = CHUNK.manifest.chunk_id
SHARD_BYTES = sum(len(b) for b in CHUNK.shards.values())


def bucket_with(manifest: bytes, keys: Sequence[str] = ()) -> MemoryStore:
    """One chunk's real shards under ``manifest``, plus objects at ``keys``."""
    store = MemoryStore()
    for rank, data in CHUNK.shards.items():
        store.put_nowait(CHUNK.manifest.shard_for_rank(rank).key, data)
    store.put_nowait(LAYOUT.manifest(NS, CHUNK_ID), manifest)
    for key in keys:
        store.put_nowait(key, b"x")
    return store


def records(store: MemoryStore) -> list[ChunkRecord | ScannedChunk]:
    async def scan() -> list[ChunkRecord | ScannedChunk]:
        return [r async for r in Catalog(store, LAYOUT).records(NS)]

    return asyncio.run(scan())


def assert_record_or_error(got: list[ChunkRecord | ScannedChunk], manifest: bytes) -> None:
    """The chunk comes back as a record of what LIST reports, or as the
    manifest decoder's error; nothing else, and no exception."""
    assert len(got) == 1
    (item,) = got
    if isinstance(item, ScannedChunk):
        assert item.error and item.objects.chunk_id == CHUNK_ID
        with pytest.raises(ManifestError):
            decode_manifest(manifest, layout=LAYOUT, expect_namespace=NS,
                            expect_chunk_id=CHUNK_ID)
        return
    assert isinstance(item, ChunkRecord) and item.chunk_id == CHUNK_ID
    assert item.bytes <= SHARD_BYTES + len(manifest)  # listed sizes, never claimed ones


def test_the_catalog_reads_a_valid_chunk_into_a_record() -> None:
    data = CHUNK.manifest.encode()
    (rec,) = records(bucket_with(data))
    assert isinstance(rec, ChunkRecord)
    assert (rec.chunk_id, rec.parent_id, rec.tp_size) == (CHUNK_ID, CIDS[0], 2)
    assert rec.bytes == SHARD_BYTES + len(data) and not rec.corrupt


@settings(max_examples=200, deadline=1000)
@given(st.binary(max_size=512))
def test_catalog_records_on_arbitrary_manifest_bytes(data: bytes) -> None:
    got = records(bucket_with(data))
    assert len(got) == 1 and isinstance(got[0], ScannedChunk) and got[0].error
    with pytest.raises(ManifestError):
        asyncio.run(Catalog(bucket_with(data), LAYOUT).read_manifest(NS, CHUNK_ID))


@settings(max_examples=200, deadline=1000)
@given(st.sampled_from(sorted(MANIFEST_DOC)), json_values)
def test_catalog_records_with_one_manifest_field_replaced(field: str, value: Any) -> None:
    doc = json.loads(CHUNK.manifest.encode())
    doc[field] = value
    data = json.dumps(doc).encode()
    assert_record_or_error(records(bucket_with(data)), data)


@settings(max_examples=200, deadline=1000)
@given(st.integers(0, 1), st.sampled_from(["key", "size", "heads", "rank", "payload_offset"]),
       json_values)
def test_catalog_records_with_one_shard_field_replaced(shard: int, field: str,
                                                        value: Any) -> None:
    doc = json.loads(CHUNK.manifest.encode())
    doc["shards"][shard][field] = value
    data = json.dumps(doc).encode()
    assert_record_or_error(records(bucket_with(data)), data)


@pytest.mark.parametrize("number", HOSTILE_NUMBERS)
@pytest.mark.parametrize("field", ["chunk_index", "num_tokens", "tp_size", "created_at",
                                   "shards.0.size", "shards.1.payload_offset"])
def test_hostile_numbers_in_a_manifest_make_catalog_errors(field: str, number: bytes) -> None:
    doc = json.loads(CHUNK.manifest.encode())
    if field.startswith("shards."):
        _, i, name = field.split(".")
        doc["shards"][int(i)][name] = "__HOLE__"
    else:
        doc[field] = "__HOLE__"
    data = json.dumps(doc).encode().replace(b'"__HOLE__"', number)
    (item,) = records(bucket_with(data))
    assert isinstance(item, ScannedChunk) and item.error


@pytest.mark.parametrize("data", [nested(60_000), b'{"shards": ' + nested(50_000) + b"}",
                                  b"[" * 10 + b"1e400" + b"]" * 10, b'"' + b"\\" * 100_000 + b'"'])
def test_hostile_structures_in_a_manifest_make_catalog_errors(data: bytes) -> None:
    (item,) = records(bucket_with(data))
    assert isinstance(item, ScannedChunk) and item.error


# Keys a listing can return under the namespace: any text after the prefix,
# with the characters s3kv's own keys are made of over-represented.
listed_keys = st.lists(
    st.text(alphabet=st.sampled_from("0123456789abcdef/.-rwtpAZ_\n%") | st.characters(),
            max_size=120).map(lambda tail: LAYOUT.namespace_prefix(NS) + tail),
    max_size=8,
)


@settings(max_examples=200, deadline=1000)
@given(listed_keys)
def test_hostile_keys_in_a_listing_never_stop_the_catalog(keys: list[str]) -> None:
    keys = [k for k in keys if k != LAYOUT.manifest(NS, CHUNK_ID)]  # not the real manifest
    store = bucket_with(CHUNK.manifest.encode(), keys)
    got = records(store)
    ours = [r for r in got if isinstance(r, ChunkRecord) and r.chunk_id == CHUNK_ID]
    assert len(ours) == 1  # the real chunk is still found, whatever lies beside it
    for key in keys:
        parsed = LAYOUT.parse(key)
        assert parsed is None or parsed.namespace == NS
