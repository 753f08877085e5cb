from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from s3kv.errors import ManifestError
from s3kv.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ShardEntry,
    decode_manifest,
)
from tests.unit.builders import CIDS, LAYOUT, NS, build_chunk

CHUNK = build_chunk(index=1, tp=4)
MANIFEST = CHUNK.manifest


def doc() -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(MANIFEST.encode())
    return parsed


def decode(d: dict[str, Any] | bytes, **kw: Any) -> Manifest:
    data = d if isinstance(d, bytes) else json.dumps(d).encode()
    return decode_manifest(data, layout=LAYOUT, **kw)


def rejects(d: dict[str, Any] | bytes, match: str, **kw: Any) -> None:
    with pytest.raises(ManifestError, match=match):
        decode(d, **kw)


def test_round_trip() -> None:
    data = MANIFEST.encode()
    got = decode_manifest(data, layout=LAYOUT, expect_namespace=NS, expect_chunk_id=CIDS[1])
    assert got == MANIFEST
    assert got.encode() == data
    assert decode_manifest(bytearray(data), layout=LAYOUT) == MANIFEST
    assert decode_manifest(memoryview(data), layout=LAYOUT) == MANIFEST


def test_manifest_fields_and_helpers() -> None:
    m = MANIFEST
    assert [s.rank for s in m.shards] == [0, 1, 2, 3]  # sorted although built reversed
    assert [(s.head_start, s.head_end) for s in m.shards] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert m.tp_size == 4 and m.num_heads == 16
    assert m.parent_id == CIDS[0]
    assert m.total_bytes == sum(len(b) for b in CHUNK.shards.values())
    assert m.writer == "tp4-writer-1"
    assert m.shard_for_rank(2).key == LAYOUT.shard(NS, CIDS[1], m.writer, 2)
    with pytest.raises(ManifestError, match="no shard for rank 4"):
        m.shard_for_rank(4)
    e = m.shard_for_rank(0)
    assert e.head_bytes * (e.head_end - e.head_start) == e.size - e.payload_offset


def test_first_chunk_round_trips_with_null_parent() -> None:
    first = build_chunk(index=0, tp=1).manifest
    assert first.parent_id is None
    assert decode(first.encode()) == first


def test_wrong_version_rejected() -> None:
    for version in (0, 1, 3, "2", None):  # 1: before TP-independent namespaces
        d = doc()
        d["version"] = version
        rejects(d, "unsupported manifest version")
    d = doc()
    d["version"] = True  # an int in Python, still not a version
    rejects(d, "unsupported manifest version")


def test_wrong_format_rejected() -> None:
    d = doc()
    d["format"] = "something.else"
    rejects(d, "not an s3kv manifest")


@pytest.mark.parametrize(
    "field",
    ["namespace", "chunk_id", "parent_id", "chunk_index", "num_tokens", "writer",
     "tp_size", "created_at", "checksum_algorithm", "shards"],
)
def test_missing_top_field_rejected(field: str) -> None:
    d = doc()
    del d[field]
    rejects(d, f"missing field '{field}'")


@pytest.mark.parametrize(
    "field", ["rank", "key", "size", "checksum", "heads", "payload_offset", "head_checksums"]
)
def test_missing_shard_field_rejected(field: str) -> None:
    d = doc()
    del d["shards"][2][field]
    rejects(d, rf"shard\[2\]: missing field '{field}'")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("chunk_index", True),
        ("chunk_index", "1"),
        ("chunk_index", 1.0),
        ("num_tokens", False),
        ("num_tokens", None),
        ("namespace", 5),
        ("writer", ["w"]),
        ("created_at", "yesterday"),
        ("created_at", True),
        ("shards", {}),
        ("parent_id", 7),
    ],
)
def test_mistyped_top_field_rejected(field: str, value: Any) -> None:
    d = doc()
    d[field] = value
    rejects(d, f"field '{field}' has type")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", True),
        ("rank", "0"),
        ("size", 1.5),
        ("size", False),
        ("payload_offset", None),
        ("key", 1),
        ("checksum", 0),
        ("heads", "0-4"),
        ("head_checksums", "abc"),
    ],
)
def test_mistyped_shard_field_rejected(field: str, value: Any) -> None:
    d = doc()
    d["shards"][0][field] = value
    rejects(d, rf"shard\[0\]: field '{field}' has type")


def test_bool_heads_rejected() -> None:
    d = doc()
    d["shards"][0]["heads"] = [False, 4]
    rejects(d, "heads must be")


def test_unknown_fields_rejected() -> None:
    d = doc()
    d["comment"] = "hand edited"
    rejects(d, "unknown field 'comment'")
    d = doc()
    d["shards"][1]["etag"] = "x"
    rejects(d, r"shard\[1\]: unknown field 'etag'")


def test_oversize_document_rejected() -> None:
    data = MANIFEST.encode()
    padded = data[:-1] + b" " * (MAX_MANIFEST_BYTES + 1 - len(data)) + b"}"
    assert len(padded) == MAX_MANIFEST_BYTES + 1
    assert json.loads(padded) == json.loads(data)  # valid JSON, just too big
    rejects(padded, "over")
    at_cap = data[:-1] + b" " * (MAX_MANIFEST_BYTES - len(data)) + b"}"
    assert decode(at_cap) == MANIFEST


def test_encode_refuses_oversize_manifest() -> None:
    n_heads = 64
    shards = tuple(
        ShardEntry(rank=r, key=LAYOUT.shard(NS, CIDS[1], "w", r), size=64 + n_heads,
                   checksum="0" * 32, head_start=r * n_heads, head_end=(r + 1) * n_heads,
                   payload_offset=64, head_checksums=("0" * 32,) * n_heads)
        for r in range(200)
    )
    big = Manifest(NS, CIDS[1], CIDS[0], 1, 256, "w", 0.0, shards, tp_size=200)
    with pytest.raises(ManifestError, match="over"):
        big.encode()
    small = Manifest(NS, CIDS[1], CIDS[0], 1, 256, "w", 0.0, shards[:2], tp_size=2)
    assert decode(small.encode()) == small


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"\xff\xfe\x00", b"{", b"[]", b"null", b'"manifest"', b"42"]
)
def test_not_json_object_rejected(data: bytes) -> None:
    with pytest.raises(ManifestError):
        decode(data)


@pytest.mark.parametrize(
    "key",
    [
        f"s3kv/{NS}/{CIDS[2][:2]}/{CIDS[2]}/writer-1/r0",  # another chunk
        f"s3kv/{'1f' * 16}/{CIDS[1][:2]}/{CIDS[1]}/writer-1/r0",  # another namespace
        f"other/{NS}/{CIDS[1][:2]}/{CIDS[1]}/writer-1/r0",
        f"s3kv/{NS}/{CIDS[1][:2]}/{CIDS[1]}/../{CIDS[2]}/r0",
        f"s3kv/{NS}/{CIDS[1][:2]}/{CIDS[1]}//r0",
        "/etc/passwd",
    ],
)
def test_shard_key_outside_chunk_prefix_rejected(key: str) -> None:
    d = doc()
    d["shards"][0]["key"] = key
    rejects(d, "outside the chunk prefix")


@pytest.mark.parametrize(
    ("ranks", "match"),
    [([0, 0, 2, 3], "ranks repeat"), ([0, 1, 2, 4], "tp_size 4 and shard ranks disagree"),
     ([1, 2, 3, 4], "tp_size 4 and shard ranks disagree"), ([-1, 1, 2, 3], "out of range")],
)
def test_duplicate_or_missing_ranks_rejected(ranks: list[int], match: str) -> None:
    d = doc()
    for shard, rank in zip(d["shards"], ranks, strict=True):
        shard["rank"] = rank
    rejects(d, match)


def test_writer_tp_size_is_recorded_and_checked() -> None:
    assert doc()["tp_size"] == 4
    for bad in (0, -1, 2, "4", None, True):  # 2: ranks 2 and 3 would not exist
        d = doc()
        d["tp_size"] = bad
        with pytest.raises(ManifestError):
            decode(d)
    # Replicated heads: TP 4 over 2 heads stores two shards, from ranks 0 and 2.
    m = build_chunk(index=1, tp=4, num_heads=2).manifest
    assert [(s.rank, s.head_start, s.head_end) for s in m.shards] == [(0, 0, 1), (2, 1, 2)]
    assert decode(m.encode(), expect_heads=2) == m
    rejects(m.encode(), "covers 2 KV heads, this engine has 4", expect_heads=4)


def test_no_shards_rejected() -> None:
    d = doc()
    d["shards"] = []
    rejects(d, "needs 1..")


@pytest.mark.parametrize("change", [lambda s: s[:-1], lambda s: [*s, s[0]], lambda s: []])
def test_wrong_head_checksum_count_rejected(change: Callable[[list[str]], list[str]]) -> None:
    d = doc()
    d["shards"][0]["head_checksums"] = change(d["shards"][0]["head_checksums"])
    rejects(d, "head_checksums must be 4")


def test_malformed_digests_rejected() -> None:
    d = doc()
    d["shards"][0]["head_checksums"][1] = "Z" * 32
    rejects(d, "head_checksums")
    d = doc()
    d["shards"][0]["checksum"] = d["shards"][0]["checksum"][:-1]
    rejects(d, "checksum must be")


@pytest.mark.parametrize(
    ("heads", "match"),
    [([4, 4], "heads must be"), ([3, 1], "heads must be"), ([0], "heads must be"),
     ([0, 1, 2], "heads must be"), ([0, 5], "does not split evenly")],
)
def test_bad_head_ranges_rejected(heads: list[int], match: str) -> None:
    d = doc()
    d["shards"][0]["heads"] = heads
    rejects(d, match)


def test_bad_sizes_rejected() -> None:
    d = doc()
    d["shards"][0]["payload_offset"] = d["shards"][0]["size"] + 1
    rejects(d, "out of range")
    d = doc()
    d["shards"][0]["size"] = 0
    rejects(d, "out of range")


def test_expectations_checked() -> None:
    rejects(doc(), "namespace", expect_namespace="1f" * 16)
    rejects(doc(), "chunk_id", expect_chunk_id=CIDS[2])
    assert decode(doc(), expect_namespace=NS, expect_chunk_id=CIDS[1]) == MANIFEST


def test_parent_rules() -> None:
    d = doc()
    d["parent_id"] = None
    rejects(d, "parent_id must be null exactly for chunk_index 0")
    d = doc()
    d["chunk_index"] = 0
    rejects(d, "parent_id must be null exactly for chunk_index 0")
    d = doc()
    d["parent_id"] = "xyz"
    rejects(d, "malformed parent_id")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("namespace", "0F" * 16, "malformed namespace"),
        ("chunk_id", CIDS[1][:-2], "malformed namespace or chunk_id"),
        ("writer", "Writer_1", "malformed writer"),
        ("chunk_index", -1, "chunk_index must be"),
        ("num_tokens", 0, "num_tokens > 0"),
        ("checksum_algorithm", "crc32c", "unsupported checksum_algorithm"),
    ],
)
def test_semantic_checks(field: str, value: Any, match: str) -> None:
    d = doc()
    d[field] = value
    rejects(d, match)


def test_manifest_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        decode(b"{}")
