"""Shard objects: one per (chunk, rank), a small header then raw KV bytes.

Payload layout is head-major: ``[heads, layers, blocks, *block_shape]``, so
the bytes of any contiguous head range are one contiguous byte range and a
reader with a different head split fetches them with one ranged GET.

The header is padded to 64 bytes so the payload can be viewed as a tensor
in place. The buffer is allocated by the caller (pinned host memory on GPU),
the header is written into it, the device copies the KV blocks straight into
the payload, and the same buffer is handed to the HTTP client: one copy from
the device, none after.

Checksums: XXH3-128 per head over the payload, and a shard checksum that is
XXH3-128 over the header bytes followed by the per-head digests. One pass
over the data yields both, and either a whole-shard or a head-range read can
be verified.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import xxhash
from typing_extensions import Buffer

from s3kv.errors import IntegrityError

MAGIC = b"S3KVSHRD"
SHARD_VERSION = 1
ALIGN = 64
_PRELUDE = struct.Struct("<8sHI")  # magic, version, json length

ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
}


@dataclass(frozen=True)
class ShardSpec:
    chunk_id: str
    rank: int
    dtype: str
    head_start: int
    head_end: int
    layer_names: tuple[str, ...]
    num_blocks: int
    block_shape: tuple[int, ...]  # per head, per block (e.g. [block_size, 2*head_size])

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def head_bytes(self) -> int:
        return (
            len(self.layer_names) * self.num_blocks * math.prod(self.block_shape)
            * ITEMSIZE[self.dtype]
        )

    @property
    def payload_bytes(self) -> int:
        return self.num_heads * self.head_bytes

    def header_doc(self) -> dict[str, object]:
        return {
            "v": SHARD_VERSION,
            "chunk_id": self.chunk_id,
            "rank": self.rank,
            "dtype": self.dtype,
            "heads": [self.head_start, self.head_end],
            "layers": list(self.layer_names),
            "blocks": self.num_blocks,
            "block_shape": list(self.block_shape),
            "order": "head,layer,block",
        }


def encode_header(spec: ShardSpec) -> bytes:
    if spec.dtype not in ITEMSIZE:
        raise ValueError(f"unsupported dtype {spec.dtype!r}; valid: {sorted(ITEMSIZE)}")
    body = json.dumps(spec.header_doc(), separators=(",", ":"), sort_keys=True).encode()
    raw = _PRELUDE.pack(MAGIC, SHARD_VERSION, len(body)) + body
    return raw + b"\x00" * (-len(raw) % ALIGN)


def shard_size(spec: ShardSpec) -> tuple[int, int]:
    """(total object size, payload offset) for ``spec``."""
    off = len(encode_header(spec))
    return off + spec.payload_bytes, off


def allocate(spec: ShardSpec) -> tuple[bytearray, memoryview]:
    """A host buffer with the header written; returns (buffer, payload view)."""
    header = encode_header(spec)
    buf = bytearray(len(header) + spec.payload_bytes)
    buf[: len(header)] = header
    return buf, memoryview(buf)[len(header) :]


def write_header(target: memoryview, spec: ShardSpec) -> int:
    """Write the header into a caller-owned buffer; returns the payload offset."""
    header = encode_header(spec)
    if len(target) != len(header) + spec.payload_bytes:
        raise ValueError(f"buffer is {len(target)} bytes, shard needs "
                         f"{len(header) + spec.payload_bytes}")
    target[: len(header)] = header
    return len(header)


def parse_header(data: Buffer) -> tuple[ShardSpec, int]:
    mv = memoryview(data)
    if len(mv) < _PRELUDE.size:
        raise IntegrityError("shard shorter than its header prelude")
    magic, version, n = _PRELUDE.unpack_from(mv)
    if magic != MAGIC or version != SHARD_VERSION:
        raise IntegrityError(f"not an s3kv shard v{SHARD_VERSION} (magic={magic!r} v={version})")
    try:
        doc = json.loads(bytes(mv[_PRELUDE.size : _PRELUDE.size + n]))
        spec = ShardSpec(
            chunk_id=doc["chunk_id"],
            rank=int(doc["rank"]),
            dtype=doc["dtype"],
            head_start=int(doc["heads"][0]),
            head_end=int(doc["heads"][1]),
            layer_names=tuple(doc["layers"]),
            num_blocks=int(doc["blocks"]),
            block_shape=tuple(int(x) for x in doc["block_shape"]),
        )
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise IntegrityError(f"shard header unreadable: {exc}") from None
    off = _PRELUDE.size + n
    return spec, off + (-off % ALIGN)


def _digest(data: Buffer) -> bytes:
    return xxhash.xxh3_128_digest(data)


@dataclass(frozen=True)
class Checksums:
    shard: str
    heads: tuple[str, ...]


def compute_checksums(data: Buffer, payload_offset: int, num_heads: int) -> Checksums:
    mv = memoryview(data).cast("B")
    payload = mv[payload_offset:]
    if num_heads <= 0 or len(payload) % num_heads:
        raise ValueError(f"payload of {len(payload)} bytes does not split into {num_heads} heads")
    step = len(payload) // num_heads
    heads = [_digest(payload[i * step : (i + 1) * step]) for i in range(num_heads)]
    h = xxhash.xxh3_128()
    h.update(mv[:payload_offset])
    for d in heads:
        h.update(d)
    return Checksums(h.hexdigest(), tuple(d.hex() for d in heads))


def verify_heads(payload: Buffer, expected: tuple[str, ...] | list[str]) -> None:
    """Check a contiguous run of whole heads against their digests."""
    mv = memoryview(payload).cast("B")
    n = len(expected)
    if n == 0 or len(mv) % n:
        raise IntegrityError(f"{len(mv)} payload bytes do not split into {n} heads")
    step = len(mv) // n
    for i, want in enumerate(expected):
        if _digest(mv[i * step : (i + 1) * step]).hex() != want:
            raise IntegrityError(f"head {i} of the range fails its checksum")
