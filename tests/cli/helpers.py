"""Populate a bucket with real committed chunks, written by s3kv's own code.

Shards are built with :func:`s3kv.shard.allocate`, checksummed with
:func:`s3kv.shard.compute_checksums`, uploaded, and only then is the
manifest written with ``If-None-Match: *``, exactly the order a commit uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from s3kv.keys import Fingerprint, KeyLayout, chain_chunk_ids
from s3kv.manifest import Manifest, ShardEntry, decode_manifest, new_manifest
from s3kv.shard import ShardSpec, allocate, compute_checksums

HEADS_PER_RANK = 2
LAYERS = ("layers.0", "layers.1")
BLOCK_SHAPE = (4, 8)  # per head, per block: 4 tokens x 8 values


def fingerprint(model: str = "tiny-llama", tp: int = 1, tag: str = "") -> Fingerprint:
    return Fingerprint(
        model=model, weights_id="w0", dtype="float16", kv_layout="NHD", block_size=4,
        chunk_tokens=4, num_layers=len(LAYERS), num_kv_heads=HEADS_PER_RANK * tp,
        head_size=4, tp_size=tp, tag=tag,
    )


def shard_bytes(cid: str, rank: int, *, salt: bytes = b"") -> tuple[bytearray, ShardSpec, int]:
    """A complete shard object (header + deterministic payload)."""
    spec = ShardSpec(
        chunk_id=cid, rank=rank, dtype="float16", head_start=rank * HEADS_PER_RANK,
        head_end=(rank + 1) * HEADS_PER_RANK, layer_names=LAYERS, num_blocks=1,
        block_shape=BLOCK_SHAPE,
    )
    buf, payload = allocate(spec)
    seed = hashlib.sha256(cid.encode() + bytes([rank]) + salt).digest()
    for i in range(0, len(payload), len(seed)):
        n = min(len(seed), len(payload) - i)
        payload[i : i + n] = seed[:n]
    return buf, spec, len(buf) - len(payload)


@dataclass
class ChunkWriter:
    """Writes chunks of one namespace as one writer (one vLLM instance)."""

    client: Any
    bucket: str
    layout: KeyLayout
    ns: str
    writer: str = "w-test"
    tp: int = 1
    salt: bytes = b""
    written: list[str] = field(default_factory=list)

    def put_namespace_doc(self, fp: Fingerprint) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.layout.namespace_doc(self.ns),
                               Body=fp.document())

    def put_shards(self, cid: str) -> list[ShardEntry]:
        entries = []
        for rank in range(self.tp):
            buf, spec, off = shard_bytes(cid, rank, salt=self.salt)
            sums = compute_checksums(buf, off, spec.num_heads)
            key = self.layout.shard(self.ns, cid, self.writer, rank)
            self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(buf))
            entries.append(ShardEntry(
                rank=rank, key=key, size=len(buf), checksum=sums.shard,
                head_start=spec.head_start, head_end=spec.head_end, payload_offset=off,
                head_checksums=sums.heads,
            ))
        return entries

    def manifest(self, cid: str, parent: str | None, index: int, num_tokens: int,
                 entries: list[ShardEntry]) -> Manifest:
        return new_manifest(
            namespace=self.ns, chunk_id=cid, parent_id=parent, chunk_index=index,
            num_tokens=num_tokens, writer=self.writer, shards=entries,
        )

    def put_manifest(self, m: Manifest) -> bool:
        """Write the manifest create-only; False if the chunk was already committed."""
        try:
            self.client.put_object(Bucket=self.bucket,
                                   Key=self.layout.manifest(self.ns, m.chunk_id),
                                   Body=m.encode(), IfNoneMatch="*")
        except ClientError as exc:
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412:
                return False
            raise
        self.written.append(m.chunk_id)
        return True

    def commit(self, cid: str, parent: str | None, index: int, num_tokens: int = 4) -> Manifest:
        m = self.manifest(cid, parent, index, num_tokens, self.put_shards(cid))
        self.put_manifest(m)
        return m

    def commit_chain(self, tokens: Sequence[int], chunk_tokens: int = 4) -> list[Manifest]:
        """Commit every chunk of ``tokens`` not yet committed, as the connector does
        (a lookup hit is never saved again); returns the chain's manifests."""
        out: list[Manifest] = []
        parent: str | None = None
        for i, cid in enumerate(chain_chunk_ids(tokens, chunk_tokens)):
            existing = self.read_manifest(cid)
            out.append(existing or self.commit(cid, parent, i, chunk_tokens))
            parent = cid
        return out

    def read_manifest(self, cid: str) -> Manifest | None:
        try:
            body = self.client.get_object(Bucket=self.bucket,
                                          Key=self.layout.manifest(self.ns, cid))["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise
        return decode_manifest(body, layout=self.layout)


def namespace_id(model: str = "tiny-llama", tp: int = 1, tag: str = "") -> str:
    return fingerprint(model, tp, tag).namespace


def list_keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys
