from __future__ import annotations

import struct

import pytest

from s3kv.errors import IntegrityError
from s3kv.shard import (
    ALIGN,
    ITEMSIZE,
    MAGIC,
    ShardSpec,
    allocate,
    compute_checksums,
    encode_header,
    parse_header,
    shard_size,
    verify_heads,
    write_header,
)
from tests.unit.builders import CIDS, LAYERS, build_shard, pattern

SPEC = ShardSpec(
    chunk_id=CIDS[0],
    rank=1,
    dtype="bfloat16",
    head_start=4,
    head_end=8,
    layer_names=LAYERS,
    num_blocks=2,
    block_shape=(16, 32),
)


def flip(data: bytes, i: int) -> bytes:
    out = bytearray(data)
    out[i] ^= 0x01
    return bytes(out)


def test_sizes() -> None:
    assert SPEC.num_heads == 4
    assert SPEC.head_bytes == 3 * 2 * 16 * 32 * 2
    assert SPEC.payload_bytes == 4 * SPEC.head_bytes
    total, off = shard_size(SPEC)
    assert off == len(encode_header(SPEC))
    assert total == off + SPEC.payload_bytes


@pytest.mark.parametrize("dtype", sorted(ITEMSIZE))
def test_header_round_trip(dtype: str) -> None:
    spec = ShardSpec(CIDS[1], 3, dtype, 0, 2, ("a", "b"), 5, (16, 2, 64))
    header = encode_header(spec)
    assert header.startswith(MAGIC)
    parsed, off = parse_header(header + b"\x00" * spec.payload_bytes)
    assert parsed == spec
    assert off == len(header)


def test_payload_offset_aligned_for_every_header_length() -> None:
    seen_lengths = set()
    for n in range(0, 130):
        spec = ShardSpec(CIDS[0], 0, "float16", 0, 1, ("x" * n,), 1, (1,))
        header = encode_header(spec)
        assert len(header) % ALIGN == 0
        assert header.rstrip(b"\x00").endswith(b"}")  # padding is zeros after the JSON
        parsed, off = parse_header(header)
        assert off == len(header)
        assert parsed == spec
        seen_lengths.add(len(header))
    assert len(seen_lengths) >= 3  # the padding really varied


def test_allocate_and_write_header() -> None:
    buf, payload = allocate(SPEC)
    total, off = shard_size(SPEC)
    assert len(buf) == total
    assert len(payload) == SPEC.payload_bytes
    payload[:] = pattern(len(payload), 1)  # writes through to buf
    assert bytes(buf[off:]) == pattern(len(payload), 1)
    assert parse_header(buf) == (SPEC, off)

    target = bytearray(total)
    assert write_header(memoryview(target), SPEC) == off
    assert bytes(target[:off]) == bytes(buf[:off])
    with pytest.raises(ValueError, match="shard needs"):
        write_header(memoryview(bytearray(total - 1)), SPEC)


def test_unsupported_dtype_rejected() -> None:
    spec = ShardSpec(CIDS[0], 0, "complex64", 0, 1, ("l",), 1, (1,))
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_header(spec)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"S3KV",
        b"NOTASHRD" + b"\x00" * 56,
        struct.pack("<8sHI", MAGIC, 2, 2) + b"{}" + b"\x00" * 50,
        struct.pack("<8sHI", MAGIC, 1, 7) + b"not{js}" + b"\x00" * 49,
        struct.pack("<8sHI", MAGIC, 1, 2) + b"{}" + b"\x00" * 50,
        struct.pack("<8sHI", MAGIC, 1, 2) + b"[]" + b"\x00" * 50,
    ],
)
def test_unreadable_headers_are_integrity_errors(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        parse_header(data)


def test_checksums_cover_every_head_and_the_header() -> None:
    data, off = build_shard(SPEC, seed=3)
    sums = compute_checksums(data, off, SPEC.num_heads)
    assert len(sums.heads) == 4
    assert len(set(sums.heads)) == 4
    assert len(sums.shard) == 32
    assert compute_checksums(bytearray(data), off, 4) == sums
    assert compute_checksums(memoryview(data), off, 4) == sums


def test_single_flipped_byte_in_header_changes_shard_checksum() -> None:
    data, off = build_shard(SPEC, seed=3)
    good = compute_checksums(data, off, SPEC.num_heads)
    for i in (0, 8, 14, off // 2, off - 1):  # magic, version, json, padding
        bad = compute_checksums(flip(data, i), off, SPEC.num_heads)
        assert bad.shard != good.shard, i
        assert bad.heads == good.heads


def test_single_flipped_byte_in_payload_changes_that_head_only() -> None:
    data, off = build_shard(SPEC, seed=3)
    good = compute_checksums(data, off, SPEC.num_heads)
    per = SPEC.head_bytes
    for head in range(SPEC.num_heads):
        for pos in (0, per // 2, per - 1):
            bad = compute_checksums(flip(data, off + head * per + pos), off, SPEC.num_heads)
            assert bad.shard != good.shard
            changed = [i for i in range(4) if bad.heads[i] != good.heads[i]]
            assert changed == [head], (head, pos)


def test_verify_heads() -> None:
    data, off = build_shard(SPEC, seed=5)
    sums = compute_checksums(data, off, SPEC.num_heads)
    payload = data[off:]
    per = SPEC.head_bytes
    verify_heads(payload, sums.heads)
    verify_heads(payload[per : 3 * per], sums.heads[1:3])
    verify_heads(payload[3 * per :], sums.heads[3:])
    with pytest.raises(IntegrityError, match="head 0 of the range"):
        verify_heads(flip(payload, per + 7)[per : 3 * per], sums.heads[1:3])
    with pytest.raises(IntegrityError, match="head 1 of the range"):
        verify_heads(flip(payload, 3 * per - 1)[per : 3 * per], sums.heads[1:3])
    with pytest.raises(IntegrityError):  # right bytes, wrong heads
        verify_heads(payload[per : 2 * per], sums.heads[2:3])
    with pytest.raises(IntegrityError, match="do not split"):
        verify_heads(payload[:-1], sums.heads)
    with pytest.raises(IntegrityError):
        verify_heads(payload, ())


def test_compute_checksums_rejects_uneven_split() -> None:
    data, off = build_shard(SPEC, seed=5)
    with pytest.raises(ValueError):
        compute_checksums(data + b"x", off, SPEC.num_heads)
    with pytest.raises(ValueError):
        compute_checksums(data, off, 0)
