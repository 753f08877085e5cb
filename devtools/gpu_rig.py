"""A worker side on real tensors, driven the way vLLM drives it, without vLLM.

Used by the GPU tests and the forward-path benchmark: it registers per-layer
KV tensors, builds the save and load plans the scheduler would send, runs
steps with the connector's hooks in vLLM's order (``Rig.step``), and reads
back what was stored, all through public methods.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from devtools.gpu_layouts import Layout
from devtools.memory_store import MemoryStore
from devtools.vllm_stub import install_if_missing
from s3kv.aio import io_loop
from s3kv.config import parse_settings
from s3kv.groups import GroupSpec, describe_groups
from s3kv.keys import ChunkRef, Fingerprint, KeyLayout
from s3kv.manifest import Manifest, decode_manifest
from s3kv.stats import Counters

install_if_missing()

from s3kv.vllm.metadata import LoadChunk, LoadRequest, S3KVMetadata, SaveChunk  # noqa: E402
from s3kv.vllm.worker_side import WorkerSide  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def chunk_id(i: int) -> str:
    return hashlib.sha256(f"chunk-{i}".encode()).hexdigest()


@dataclass
class Rig:
    layout: Layout
    device: str
    layers: int = 4
    heads: int = 2
    head_size: int = 64
    block_size: int = 16
    chunk_tokens: int = 64
    num_blocks: int = 64
    dtype: str = "bfloat16"
    max_inflight_mib: int = 1024
    # How long loads may take: the engine's max_cache_wait_s and every load's deadline.
    wait_s: float = 60.0
    # vLLM's KV cache groups (hybrid models); empty: one group of every layer.
    groups: tuple[GroupSpec, ...] = ()
    store: MemoryStore = field(default_factory=MemoryStore)
    caches: dict[str, torch.Tensor] = field(default_factory=dict)
    worker: WorkerSide | None = None
    _round: int = 0

    def __post_init__(self) -> None:
        settings = parse_settings({"bucket": "gpu-check", "chunk_tokens": self.chunk_tokens,
                                   "max_cache_wait_s": self.wait_s,
                                   "max_inflight_mib": self.max_inflight_mib})
        if self.layout.mla:
            self.heads = 1  # one latent, shared by every rank
        self.fp = Fingerprint(
            model="gpu-check", weights_id="random", dtype=self.dtype,
            chunk_tokens=self.chunk_tokens, num_layers=self.layers,
            num_kv_heads=self.heads, head_size=self.head_size,
            attention="mla" if self.layout.mla else "mha",
            groups=describe_groups(self.groups),
        )
        self.keys = KeyLayout(settings.store.prefix)
        self.caches = {
            f"model.layers.{i}.self_attn.attn": self.layout.allocate(
                self.num_blocks, self.heads, self.block_size, self.head_size,
                DTYPES[self.dtype], self.device)
            for i in range(self.layers)
        }
        # SSM layers: vLLM's raw pages, [blocks, 1, 1, page] int8, each page the
        # layer's state then padding, and pages further apart than they are long.
        for g in self.groups:
            if g.kind == "state":
                for name in g.layers:
                    raw = torch.zeros(self.num_blocks, g.state_bytes + 96, dtype=torch.int8,
                                      device=self.device)
                    self.caches[name] = raw[:, : g.state_bytes + 32].unsqueeze(1).unsqueeze(1)
        self.worker = WorkerSide(
            settings, self.fp, self.num_blocks, self.block_size, tp_rank=0, tp_size=1,
            tp_ranks=[0], can_load=True, can_save=True, counters=Counters(), store=self.store,
            token_map=self.layout.token_map(self.block_size, self.head_size),
            groups=self.groups,
        )
        self.worker.register_kv_caches(self.caches)

    @property
    def attention_layers(self) -> list[str]:
        return [f"model.layers.{i}.self_attn.attn" for i in range(self.layers)]

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_size

    @property
    def chunk_payload_bytes(self) -> int:
        return (self.layers * self.heads * self.chunk_tokens * self.fp.token_elems
                * torch.tensor([], dtype=DTYPES[self.dtype]).element_size())

    def canonical(self, seed: int) -> list[torch.Tensor]:
        """Random per-layer KV (``[B, H, N, 2, D]``, MLA ``[B, 1, N, C]``) in every layer."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        shape = self.layout.canonical_shape(self.num_blocks, self.heads, self.block_size,
                                            self.head_size)
        for name in self.attention_layers:
            t = self.caches[name]
            c = torch.randn(shape, generator=g, device=self.device).to(DTYPES[self.dtype])
            self.layout.fill(t, c)
            out.append(c)
        return out

    def save_meta(self, saves: list[tuple[str, list[int]]]) -> S3KVMetadata:
        self._round += 1
        return S3KVMetadata(saves=[
            SaveChunk(ChunkRef(cid, None, 0, self.chunk_tokens), (tuple(ids),))
            for cid, ids in saves
        ], round_id=self._round)

    def step(self, meta: S3KVMetadata, forward: Callable[[], None] | None = None) -> None:
        """One engine step: ``forward`` launches the step's kernels, then the
        worker side's hooks run in the order vLLM calls them.

        vLLM 0.32 (``vllm/v1/worker/kv_connector_model_runner_mixin.py``,
        ``KVConnectorModelRunnerMixin._get_kv_connector_output``, the context
        ``GPUModelRunner.execute_model`` launches ``_model_forward`` in; the
        CPU model runner inherits it): when the step has no synchronous loads
        (``SchedulerOutput.has_sync_kv_loads`` False, always so with s3kv,
        whose loads are asynchronous), the forward is launched first, calling
        ``save_kv_layer`` per attention layer as it goes (a no-op in s3kv:
        chunks are copied once per step), then in the context's ``finally``
        ``start_load_kv``, then ``wait_for_save`` (deferred until after the
        drafter with speculative decoding, still before the next step). The
        model runner v2 (``vllm/v1/worker/gpu/kv_connector.py``,
        ``KVConnector.pre_forward``/``post_forward``) keeps the same order.
        The order came with vllm-project/vllm#53333 ("start async KV loads
        after the forward launch"), and the upstream source read after 0.32
        keeps it. The next step's forward is
        launched right after ``wait_for_save``, with no hook in between.
        """
        if forward is not None:
            forward()
        if self.worker is None:
            raise RuntimeError("the rig is closed")
        self.worker.start_load_kv(meta)
        self.worker.wait_for_save(meta)

    def manifest(self, cid: str) -> Manifest:
        body = io_loop().run(self.store.get(self.keys.manifest(self.fp.namespace, cid)), 30)
        return decode_manifest(body, layout=self.keys, expect_namespace=self.fp.namespace,
                               expect_chunk_id=cid)

    def shard_key(self, cid: str) -> str:
        return self.manifest(cid).shard_for_rank(0).key

    def get(self, key: str) -> bytes:
        return bytes(io_loop().run(self.store.get(key), 30))

    def put(self, key: str, data: bytes) -> None:
        io_loop().run(self.store.put(key, data), 30)

    def load_meta(self, req_id: str, cid: str, dest: list[int]) -> S3KVMetadata:
        m = self.manifest(cid)
        chunk = LoadChunk(m, (tuple(enumerate(dest)),))
        return S3KVMetadata(loads=[LoadRequest(req_id, (chunk,), self.wait_s)])

    def flush(self) -> None:
        if self.worker is None or not self.worker.flush(timeout=120):
            raise RuntimeError("worker side did not settle within 120 s")

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
