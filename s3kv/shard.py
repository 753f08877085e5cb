"""Shard objects: the one owner of the stored KV byte format.

A shard is one object holding a contiguous range of KV heads of one chunk:
a small header, then the payload. Everything about those bytes lives here:
the header, the payload layout, the checksums, the manifest entry that
describes a sealed shard, and the checks a reader runs before any byte may
reach the model.

Payload layout: ``[heads, layers, tokens, token_elems]``, head-major and
token-major. Head-major so the bytes of any contiguous head range are one
contiguous byte range (a reader holding other heads than the writer fetches
them with one ranged GET); token-major so the bytes do not depend on the
engine's block size (a 256-token chunk is the same bytes in blocks of 16, 32
or 128). ``token_elems`` is ``2 * head_size`` for attention with separate K
and V (keys first, then values) and the latent width for MLA, where the one
latent "head" is shared by every rank. The engine's tensor layout (NHD, HND,
K/V or blocks first) is mapped to this order by ``s3kv.vllm.kv_layout``.

Hybrid models (vLLM's hybrid KV cache manager: one KV cache group per kind
of layer) store one section per group, one after the other, each
``[heads, group layers, tokens from its start, token_elems]``. A section
starts at the first token worth storing for its group (``s3kv.groups``: a
sliding-window group skips the blocks no later hit needs); the header and
the manifest entry record each section's start. Each section is head-major,
so a reader takes a head range of the sections it needs with one ranged GET
per section. A single-group engine writes one section starting at 0, and
its shards carry exactly the bytes, header and manifest they always did.

A state group (SSM / linear attention, ``s3kv.groups``) has no tokens: its
section holds the recurrent state after the chunk's last token, every
layer's state bytes one after the other, or nothing (start ``tokens``) when
the chunk has none. Its bytes are split into as many equal slices as the
shard has heads, zero-padded, so each slice has a digest like a head's. The
slices are not heads: a state is read back only whole, by a reader with the
writer's TP size (the namespace holds it).

The header is padded to 64 bytes so the payload can be viewed as a tensor in
place. The caller allocates the buffer (pinned host memory on GPU), writes
the header into it, and the device copies the KV blocks straight into the
payload; the same buffer is then uploaded: one copy from the device, none
after.

Checksums: XXH3-128 per head of each section over the payload, and a shard checksum that is
XXH3-128 over the header bytes followed by the per-head digests. One pass
over the data yields both, so either a whole-shard or a head-range read can
be verified. 128 bits make an undetected random corruption vanishingly
unlikely at fleet scale (CRC32C's 32 bits would let one in four billion
corrupted shards through, and a wrong KV block is a silent wrong answer),
and XXH3 runs at memory bandwidth, so verifying a load costs less than the
GET it follows. It is not a defence against an attacker with write access
to the bucket: IAM is.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import xxhash
from typing_extensions import Buffer

from s3kv.errors import IntegrityError
from s3kv.jsondoc import loads_strict
from s3kv.manifest import ShardEntry

MAGIC = b"S3KVSHRD"
SHARD_VERSION = 2
ALIGN = 64
ORDER = "head,layer,token"
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
class PayloadLayout:
    """What one head of a chunk looks like: the same for every shard of a
    namespace, whatever the writer's or the reader's TP size or block size.

    ``groups``: layers per KV cache group, in order (``layer_names`` lists
    them group by group); empty for one group of every layer. Each group is
    a section of the payload, ``[heads, group layers, tokens, token_elems]``,
    and a section may start at a later token of the chunk than 0
    (``s3kv.groups``): what a shard holds is this layout plus its sections'
    start tokens.
    """

    dtype: str
    layer_names: tuple[str, ...]
    tokens: int
    token_elems: int
    groups: tuple[int, ...] = ()
    # Per group: bytes of one head-slice of a state section (0: a token group).
    state_bytes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"unsupported dtype {self.dtype!r}; valid: {sorted(ITEMSIZE)}")
        if len(self.groups) == 1:
            object.__setattr__(self, "groups", ())
        if self.groups and (sum(self.groups) != len(self.layer_names)
                            or min(self.groups) < 1):
            raise ValueError(f"groups {self.groups} do not partition "
                             f"{len(self.layer_names)} layers")
        if not any(self.state_bytes):
            object.__setattr__(self, "state_bytes", ())
        if self.state_bytes and (len(self.state_bytes) != len(self.groups)
                                 or min(self.state_bytes) < 0):
            raise ValueError(f"state_bytes {self.state_bytes} do not fit groups {self.groups}")

    def is_state(self, group: int) -> bool:
        return bool(self.state_bytes) and self.state_bytes[group] > 0

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return self.groups or (len(self.layer_names),)

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    def section_head_bytes(self, group: int, start: int = 0) -> int:
        """Bytes of one head of group ``group``'s section, from token ``start``."""
        if self.is_state(group):
            return self.state_bytes[group] if start < self.tokens else 0
        return (self.group_sizes[group] * (self.tokens - start) * self.token_elems
                * ITEMSIZE[self.dtype])

    def head_bytes_for(self, starts: tuple[int, ...]) -> int:
        """Bytes of one head over every section, given their start tokens."""
        return sum(self.section_head_bytes(g, s) for g, s in enumerate(self.starts(starts)))

    def starts(self, starts: tuple[int, ...]) -> tuple[int, ...]:
        """``starts`` checked against this layout (``()``: every section from 0)."""
        if not starts:
            return (0,) * self.num_groups
        if len(starts) != self.num_groups or not all(0 <= s <= self.tokens for s in starts) \
                or any(self.is_state(g) and s not in (0, self.tokens)
                       for g, s in enumerate(starts)):
            raise IntegrityError(f"section starts {starts} do not fit {self.num_groups} "
                                 f"groups of {self.tokens} tokens")
        return tuple(starts)

    @property
    def head_bytes(self) -> int:
        return self.head_bytes_for(())


@dataclass(frozen=True)
class ShardSpec:
    chunk_id: str
    rank: int  # the writer rank that uploaded it
    head_start: int
    head_end: int
    layout: PayloadLayout
    # Start token of each group's section (``()``: one group, or all from 0).
    starts: tuple[int, ...] = ()

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def head_bytes(self) -> int:
        return self.layout.head_bytes_for(self.starts)

    @property
    def payload_bytes(self) -> int:
        return self.num_heads * self.head_bytes

    def section_bounds(self) -> list[tuple[int, int]]:
        """Each section's ``[lo, hi)`` inside the payload."""
        out, at = [], 0
        for g, s in enumerate(self.layout.starts(self.starts)):
            n = self.num_heads * self.layout.section_head_bytes(g, s)
            out.append((at, at + n))
            at += n
        return out

    def header_doc(self) -> dict[str, object]:
        lay = self.layout
        doc: dict[str, object] = {
            "v": SHARD_VERSION,
            "chunk_id": self.chunk_id,
            "rank": self.rank,
            "dtype": lay.dtype,
            "heads": [self.head_start, self.head_end],
            "layers": list(lay.layer_names),
            "tokens": lay.tokens,
            "token_elems": lay.token_elems,
            "order": ORDER,
        }
        if lay.groups:  # one group: the header every single-group shard has had
            doc["groups"] = list(lay.groups)
            doc["starts"] = list(lay.starts(self.starts))
        if lay.state_bytes:
            doc["state_bytes"] = list(lay.state_bytes)
        return doc


# --- building -------------------------------------------------------------------


def encode_header(spec: ShardSpec) -> bytes:
    """The header bytes, padded so the payload that follows is 64-byte aligned."""
    body = json.dumps(spec.header_doc(), separators=(",", ":"), sort_keys=True).encode()
    raw = _PRELUDE.pack(MAGIC, SHARD_VERSION, len(body)) + body
    return raw + b"\x00" * (-len(raw) % ALIGN)


def allocate(spec: ShardSpec) -> tuple[bytearray, memoryview]:
    """A host buffer with the header written; returns (buffer, payload view)."""
    header = encode_header(spec)
    buf = bytearray(len(header) + spec.payload_bytes)
    buf[: len(header)] = header
    return buf, memoryview(buf)[len(header) :]


def seal(data: Buffer, key: str) -> ShardEntry:
    """Checksum a filled shard and describe it for the manifest.

    Reads everything it needs from the shard's own header, so whoever moves
    shards around (the committer) needs to know nothing about heads.
    """
    spec, off = parse_header(data)
    mv = memoryview(data).cast("B")
    if len(mv) != off + spec.payload_bytes:
        raise IntegrityError(f"shard {key} is {len(mv)} bytes, its header says "
                             f"{off + spec.payload_bytes}")
    heads = [d for lo, hi in spec.section_bounds()
             for d in _head_digests(mv[off + lo : off + hi], spec.num_heads)]
    h = xxhash.xxh3_128()
    h.update(mv[:off])
    for d in heads:
        h.update(d)
    return ShardEntry(
        rank=spec.rank, key=key, size=len(mv), checksum=h.hexdigest(),
        head_start=spec.head_start, head_end=spec.head_end, payload_offset=off,
        head_checksums=tuple(d.hex() for d in heads),
        starts=spec.layout.starts(spec.starts) if spec.layout.groups else (),
    )


# --- parsing and verifying --------------------------------------------------------


def parse_header(data: Buffer) -> tuple[ShardSpec, int]:
    """The spec a shard's header claims and its payload offset; IntegrityError if unreadable."""
    mv = memoryview(data)
    if len(mv) < _PRELUDE.size:
        raise IntegrityError("shard shorter than its header prelude")
    magic, version, n = _PRELUDE.unpack_from(mv)
    if magic != MAGIC or version != SHARD_VERSION:
        raise IntegrityError(f"not an s3kv shard v{SHARD_VERSION} (magic={magic!r} v={version})")
    try:
        doc = loads_strict(mv[_PRELUDE.size : _PRELUDE.size + n])
        if doc["order"] != ORDER:
            raise ValueError(f"payload order {doc['order']!r}")
        spec = ShardSpec(
            chunk_id=doc["chunk_id"],
            rank=int(doc["rank"]),
            head_start=int(doc["heads"][0]),
            head_end=int(doc["heads"][1]),
            layout=PayloadLayout(
                dtype=doc["dtype"],
                layer_names=tuple(doc["layers"]),
                tokens=int(doc["tokens"]),
                token_elems=int(doc["token_elems"]),
                groups=tuple(int(k) for k in doc.get("groups", ())),
                state_bytes=tuple(int(k) for k in doc.get("state_bytes", ())),
            ),
            starts=tuple(int(t) for t in doc.get("starts", ())),
        )
        spec.layout.starts(spec.starts)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise IntegrityError(f"shard header unreadable: {exc}") from None
    off = _PRELUDE.size + n
    return spec, off + (-off % ALIGN)


def verify_whole(body: Buffer, entry: ShardEntry, chunk_id: str,
                 expect: PayloadLayout) -> memoryview:
    """Check a whole fetched shard; returns its payload (zero-copy).

    Against the manifest entry (size, offset, heads, every checksum) and
    against the reader's engine (dtype, layers, tokens, elements per token).
    """
    mv = memoryview(body).cast("B")
    if len(mv) != entry.size:
        raise IntegrityError(f"shard {entry.key} is {len(mv)} bytes, manifest says {entry.size}")
    spec, off = parse_header(mv)
    if off != entry.payload_offset:
        raise IntegrityError(f"shard {entry.key} payload offset {off} != {entry.payload_offset}")
    if spec.chunk_id != chunk_id or spec.rank != entry.rank:
        raise IntegrityError(
            f"shard {entry.key} header names chunk {spec.chunk_id[:12]} rank {spec.rank}"
        )
    if (spec.head_start, spec.head_end) != (entry.head_start, entry.head_end):
        raise IntegrityError(f"shard {entry.key} header heads differ from the manifest")
    if spec.layout != expect:
        raise IntegrityError(f"shard {entry.key} layout {spec.layout} does not match this "
                             f"engine {expect}")
    if spec.starts != entry.starts:
        raise IntegrityError(f"shard {entry.key} sections start at {spec.starts}, the "
                             f"manifest says {entry.starts}")
    if seal(mv, entry.key) != entry:
        raise IntegrityError(f"shard {entry.key} fails its checksum")
    return mv[off:]


def range_bounds(entry: ShardEntry, head_start: int, head_end: int,
                 expect: PayloadLayout, section: int = 0) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` of heads ``[head_start, head_end)`` of section
    ``section`` inside a shard object.

    The size a reader expects per head comes from its own engine, never from
    the stored object, so a shard of another shape cannot be read as this one.
    """
    if not entry.head_start <= head_start < head_end <= entry.head_end:
        raise IntegrityError(
            f"heads [{head_start},{head_end}) not inside shard heads "
            f"[{entry.head_start},{entry.head_end})"
        )
    starts = expect.starts(entry.starts)
    if not 0 <= section < len(starts):
        raise IntegrityError(f"no section {section} in shard {entry.key}")
    n = entry.head_end - entry.head_start
    if entry.size - entry.payload_offset != n * expect.head_bytes_for(entry.starts):
        raise IntegrityError(f"shard {entry.key} does not hold "
                             f"{expect.head_bytes_for(entry.starts)}-byte heads")
    per = expect.section_head_bytes(section, starts[section])
    base = entry.payload_offset + n * sum(
        expect.section_head_bytes(g, starts[g]) for g in range(section))
    lo = base + (head_start - entry.head_start) * per
    return lo, lo + (head_end - head_start) * per


def verify_range(body: Buffer, entry: ShardEntry, head_start: int, head_end: int,
                 section: int = 0) -> None:
    """Check the bytes of heads ``[head_start, head_end)`` of one section against
    their digests (``head_checksums`` lists each section's heads in turn)."""
    n_entry = entry.head_end - entry.head_start
    base = section * n_entry + head_start - entry.head_start
    expected = entry.head_checksums[base : base + head_end - head_start]
    mv = memoryview(body).cast("B")
    n = len(expected)
    if n != head_end - head_start or n == 0 or len(mv) % n:
        raise IntegrityError(f"{len(mv)} payload bytes do not split into {n} heads")
    for i, got in enumerate(_head_digests(mv, n)):
        if got.hex() != expected[i]:
            raise IntegrityError(f"head {head_start + i} of {entry.key} fails its checksum")


def _head_digests(payload: memoryview, num_heads: int) -> list[bytes]:
    if num_heads <= 0 or len(payload) % num_heads:
        raise IntegrityError(
            f"payload of {len(payload)} bytes does not split into {num_heads} heads")
    step = len(payload) // num_heads
    return [xxhash.xxh3_128_digest(payload[i * step : (i + 1) * step]) for i in range(num_heads)]
