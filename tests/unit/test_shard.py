from __future__ import annotations

import dataclasses
import json
import struct

import pytest

from s3kv.errors import IntegrityError
from s3kv.shard import (
    ALIGN,
    ITEMSIZE,
    MAGIC,
    PayloadLayout,
    ShardSpec,
    allocate,
    encode_header,
    parse_header,
    range_bounds,
    seal,
    verify_range,
    verify_whole,
)
from tests.unit.builders import CIDS, LAYERS, PAYLOAD, build_shard, head_pattern

SPEC = ShardSpec(chunk_id=CIDS[0], rank=1, head_start=4, head_end=8, layout=PAYLOAD)
KEY = "s3kv/ns/aa/cid/w/r1"


def flip(data: bytes, i: int) -> bytes:
    out = bytearray(data)
    out[i] ^= 0x01
    return bytes(out)


def test_sizes() -> None:
    assert SPEC.num_heads == 4
    assert SPEC.head_bytes == 3 * 8 * 16 * 2  # layers x tokens x elements x fp16
    assert SPEC.payload_bytes == 4 * SPEC.head_bytes


def test_payload_bytes_do_not_depend_on_the_block_size() -> None:
    """Token-major: a 256-token chunk is the same bytes in blocks of 16 or 128."""
    lay = PayloadLayout("bfloat16", LAYERS, 256, 2 * 128)
    assert lay.head_bytes == 3 * 256 * 256 * 2
    doc = ShardSpec(CIDS[0], 0, 0, 1, lay).header_doc()
    assert doc["order"] == "head,layer,token" and doc["tokens"] == 256
    assert "blocks" not in doc and "block_shape" not in doc


@pytest.mark.parametrize("dtype", sorted(ITEMSIZE))
def test_header_round_trip(dtype: str) -> None:
    spec = ShardSpec(CIDS[1], 3, 0, 2, PayloadLayout(dtype, ("a", "b"), 5, 576))
    header = encode_header(spec)
    assert header.startswith(MAGIC)
    parsed, off = parse_header(header + b"\x00" * spec.payload_bytes)
    assert parsed == spec
    assert off == len(header)


def test_payload_offset_aligned_for_every_header_length() -> None:
    seen_lengths = set()
    for n in range(0, 130):
        spec = ShardSpec(CIDS[0], 0, 0, 1, PayloadLayout("float16", ("x" * n,), 1, 1))
        header = encode_header(spec)
        assert len(header) % ALIGN == 0
        assert header.rstrip(b"\x00").endswith(b"}")  # padding is zeros after the JSON
        parsed, off = parse_header(header)
        assert off == len(header)
        assert parsed == spec
        seen_lengths.add(len(header))
    assert len(seen_lengths) >= 3  # the padding really varied


def test_allocate_writes_the_header() -> None:
    buf, payload = allocate(SPEC)
    off = len(encode_header(SPEC))
    assert len(buf) == off + SPEC.payload_bytes
    assert len(payload) == SPEC.payload_bytes
    payload[:] = b"\x05" * len(payload)  # writes through to buf
    assert bytes(buf[off:]) == b"\x05" * len(payload)
    assert parse_header(buf) == (SPEC, off)


def test_unsupported_dtype_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        PayloadLayout("complex64", ("l",), 1, 1)


def _header(doc: dict[str, object]) -> bytes:
    body = json.dumps(doc).encode()
    raw = struct.pack("<8sHI", MAGIC, 2, len(body)) + body
    return raw + b"\x00" * (-len(raw) % ALIGN)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"S3KV",
        b"NOTASHRD" + b"\x00" * 56,
        struct.pack("<8sHI", MAGIC, 1, 2) + b"{}" + b"\x00" * 50,  # the old format
        struct.pack("<8sHI", MAGIC, 3, 2) + b"{}" + b"\x00" * 50,
        struct.pack("<8sHI", MAGIC, 2, 7) + b"not{js}" + b"\x00" * 49,
        struct.pack("<8sHI", MAGIC, 2, 2) + b"{}" + b"\x00" * 50,
        struct.pack("<8sHI", MAGIC, 2, 2) + b"[]" + b"\x00" * 50,
        _header({**SPEC.header_doc(), "order": "layer,head,token"}),
        _header({**SPEC.header_doc(), "dtype": "complex64"}),
        _header({k: v for k, v in SPEC.header_doc().items() if k != "token_elems"}),
    ],
)
def test_unreadable_headers_are_integrity_errors(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        parse_header(data)


def test_seal_describes_the_shard_from_its_own_header() -> None:
    data = build_shard(SPEC)
    entry = seal(data, KEY)
    assert (entry.rank, entry.key, entry.size) == (1, KEY, len(data))
    assert (entry.head_start, entry.head_end) == (4, 8)
    assert entry.payload_offset == len(encode_header(SPEC))
    assert len(entry.head_checksums) == 4 and len(set(entry.head_checksums)) == 4
    assert len(entry.checksum) == 32
    assert seal(bytearray(data), KEY) == entry
    assert seal(memoryview(data), KEY) == entry


def test_seal_rejects_a_buffer_of_the_wrong_size() -> None:
    data = build_shard(SPEC)
    for bad in (data + b"x", data[:-1]):
        with pytest.raises(IntegrityError, match="header says"):
            seal(bad, KEY)


def test_single_flipped_byte_in_header_changes_shard_checksum_only() -> None:
    data = build_shard(SPEC)
    good = seal(data, KEY)
    off = good.payload_offset
    for i in (off // 2, off - 1):  # JSON and padding (the prelude would not parse)
        try:
            bad = seal(flip(data, i), KEY)
        except IntegrityError:
            continue  # a header that no longer parses is as good as a mismatch
        assert bad.checksum != good.checksum, i
        assert bad.head_checksums == good.head_checksums


def test_single_flipped_byte_in_payload_changes_that_head_only() -> None:
    data = build_shard(SPEC)
    good = seal(data, KEY)
    off, per = good.payload_offset, SPEC.head_bytes
    for head in range(SPEC.num_heads):
        for pos in (0, per // 2, per - 1):
            bad = seal(flip(data, off + head * per + pos), KEY)
            assert bad.checksum != good.checksum
            changed = [i for i in range(4) if bad.head_checksums[i] != good.head_checksums[i]]
            assert changed == [head], (head, pos)


def test_verify_whole() -> None:
    data = build_shard(SPEC)
    entry = seal(data, KEY)
    payload = verify_whole(data, entry, CIDS[0], PAYLOAD)
    assert bytes(payload) == b"".join(head_pattern(h) for h in range(4, 8))
    with pytest.raises(IntegrityError, match="fails its checksum"):
        verify_whole(flip(data, len(data) - 1), entry, CIDS[0], PAYLOAD)
    with pytest.raises(IntegrityError, match="manifest says"):
        verify_whole(data[:-1], entry, CIDS[0], PAYLOAD)
    with pytest.raises(IntegrityError, match="header names chunk"):
        verify_whole(data, entry, CIDS[1], PAYLOAD)
    with pytest.raises(IntegrityError, match="rank"):
        verify_whole(data, dataclasses.replace(entry, rank=0), CIDS[0], PAYLOAD)
    with pytest.raises(IntegrityError, match="heads differ"):
        verify_whole(data, dataclasses.replace(entry, head_start=0, head_end=4), CIDS[0], PAYLOAD)
    with pytest.raises(IntegrityError, match="payload offset"):
        verify_whole(data, dataclasses.replace(entry, payload_offset=64 * 9), CIDS[0], PAYLOAD)


@pytest.mark.parametrize("change", [
    {"dtype": "bfloat16"}, {"tokens": 16, "token_elems": 8}, {"layer_names": LAYERS[::-1]},
    {"layer_names": LAYERS[:2]},
])
def test_verify_whole_rejects_another_engine_layout(change: dict[str, object]) -> None:
    data = build_shard(SPEC)
    entry = seal(data, KEY)
    with pytest.raises(IntegrityError, match="does not match this engine"):
        verify_whole(data, entry, CIDS[0], dataclasses.replace(PAYLOAD, **change))  # type: ignore[arg-type]


def test_range_bounds_and_verify_range() -> None:
    data = build_shard(SPEC)
    entry = seal(data, KEY)
    per = SPEC.head_bytes
    for lo in range(4, 8):
        for hi in range(lo + 1, 9):
            a, b = range_bounds(entry, lo, hi, PAYLOAD)
            assert (a, b) == (entry.payload_offset + (lo - 4) * per,
                              entry.payload_offset + (hi - 4) * per)
            verify_range(data[a:b], entry, lo, hi)
            assert data[a:b] == b"".join(head_pattern(h) for h in range(lo, hi))
    a, b = range_bounds(entry, 5, 7, PAYLOAD)
    with pytest.raises(IntegrityError, match="head 6 of"):
        verify_range(flip(data, b - 1)[a:b], entry, 5, 7)
    with pytest.raises(IntegrityError, match="head 5 of"):
        verify_range(flip(data, a)[a:b], entry, 5, 7)
    with pytest.raises(IntegrityError):  # right bytes, wrong heads
        verify_range(data[a : a + per], entry, 6, 7)
    with pytest.raises(IntegrityError, match="do not split"):
        verify_range(data[a : b - 1], entry, 5, 7)
    for lo, hi in ((3, 5), (0, 1), (7, 9), (5, 5), (6, 5)):
        with pytest.raises(IntegrityError, match="not inside"):
            range_bounds(entry, lo, hi, PAYLOAD)


def test_range_bounds_use_the_readers_head_size() -> None:
    """A shard of another shape is not read as this one, even with matching digests."""
    entry = seal(build_shard(SPEC), KEY)
    other = dataclasses.replace(PAYLOAD, tokens=PAYLOAD.tokens * 2)
    with pytest.raises(IntegrityError, match="does not hold"):
        range_bounds(entry, 4, 5, other)
