"""Every decoder of bucket documents rejects hostile input with its own error.

Anyone with write access to the bucket can put any bytes under any key. The
engine, ``ls``, ``gc`` and ``verify`` catch the decoders' own error types
(``ManifestError``, ``IntegrityError``), so any other exception (a
``RecursionError`` from deep nesting, an ``OverflowError`` from ``Infinity``
where an int belongs) would stop a tool. Hypothesis drives each decoder with
arbitrary bytes, arbitrary JSON, and valid documents with one field replaced
by an arbitrary JSON value; its per-example deadline bounds the cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.memory_store import MemoryStore
from s3kv.catalog import Catalog
from s3kv.errors import IntegrityError, ManifestError
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
