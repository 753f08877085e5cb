"""What the scheduler sends every worker each step (identical on every rank)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from s3kv.keys import ChunkRef
from s3kv.manifest import Manifest


@dataclass(frozen=True)
class LoadChunk:
    manifest: Manifest
    # (block offset inside the chunk, destination block id)
    blocks: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class LoadRequest:
    req_id: str
    chunks: tuple[LoadChunk, ...]
    # How long the loads may take, from when a worker starts them: past it a
    # recompute would have been faster (s3kv.deadlines). Same on every rank.
    deadline_s: float = 30.0
    # Blocks vLLM was promised but that no chunk here fills (the scheduler's
    # alignment guard refused the chunk): reported as load errors at once, so
    # vLLM recomputes them. Empty unless something upstream slipped.
    refused_blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class SaveChunk:
    ref: ChunkRef
    block_ids: tuple[int, ...]


@dataclass
class S3KVMetadata(KVConnectorMetadata):
    loads: list[LoadRequest] = field(default_factory=list)
    saves: list[SaveChunk] = field(default_factory=list)
    round_id: int = -1
