"""What the scheduler sends every worker each step (identical on every rank), and
what the workers send back: the commit's outcome of each planned save."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from s3kv.keys import ChunkRef
from s3kv.manifest import Manifest


@dataclass(frozen=True)
class LoadChunk:
    manifest: Manifest
    # Per KV cache group: (block offset inside the chunk, destination block id).
    # A window group lists only the blocks its window still covers at the
    # hit's end (vLLM's null blocks stand for the rest); often none. A state
    # group lists one block, the state at the hit's end, in the hit's last chunk.
    groups: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def block_ids(self) -> set[int]:
        return {bid for pairs in self.groups for _, bid in pairs}


@dataclass(frozen=True)
class LoadRequest:
    req_id: str
    chunks: tuple[LoadChunk, ...]
    # How long the loads may take, from when a worker starts them: past it a
    # recompute would have been faster (s3kv.deadlines). Same on every rank.
    # Required: the scheduler computes it (Deadlines.load_s, itself at most
    # Settings.max_cache_wait_s), and the worker caps it at that bound again,
    # so no default here could silently disagree with the configured one.
    deadline_s: float
    # Blocks vLLM was promised but that no chunk here fills (the scheduler's
    # alignment guard refused the chunk): reported as load errors at once, so
    # vLLM recomputes them. Empty unless something upstream slipped.
    refused_blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class SaveChunk:
    ref: ChunkRef
    # Per KV cache group: the blocks stored, the chunk's last ones from the
    # group's start token on (``s3kv.groups``); for a state group the block
    # holding the state at the chunk's end, or none.
    block_ids: tuple[tuple[int, ...], ...]
    # Start token of each group's section; empty for a single group (from 0).
    starts: tuple[int, ...] = ()


@dataclass
class S3KVMetadata(KVConnectorMetadata):
    loads: list[LoadRequest] = field(default_factory=list)
    saves: list[SaveChunk] = field(default_factory=list)
    round_id: int = -1


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    """What the scheduler cannot see from vLLM's own output.

    ``committed`` / ``failed``: chunks whose planned save committed, or ended
    without a commit. Only rank 0 writes manifests, so only rank 0 has these;
    the scheduler closes its save plans with them (s3kv.index).
    ``late_loads``: chunks whose loads were abandoned at their deadline. vLLM
    hears of them only as failed blocks; they are slow, not damaged, so the
    scheduler does not set them aside as bad.
    ``bad_loads``: chunks whose loads failed otherwise (missing, corrupt,
    refused): the scheduler sets them aside. With several KV cache groups
    vLLM hears only which request failed, not which blocks.

    vLLM merges every rank's report of a step with :meth:`aggregate` before
    handing it to the scheduler."""

    committed: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    late_loads: tuple[str, ...] = ()
    bad_loads: tuple[str, ...] = ()

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, WorkerReport):
            raise TypeError(f"cannot merge {type(other).__name__} into WorkerReport")
        return WorkerReport(self.committed + other.committed, self.failed + other.failed,
                            self.late_loads + other.late_loads,
                            self.bad_loads + other.bad_loads)
