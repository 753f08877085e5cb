"""SSM / linear-attention states in vLLM's cache, and the copies in and out of them.

vLLM hands the connector one tensor per Mamba-like layer: its raw pages,
``[num_blocks, 1, 1, page_bytes]`` int8, each page holding the layer's state
tensors (conv, then SSM; ``MambaBase.bind_kv_cache``) packed from its first
byte, then padding up to the attention page size. A block's state is
therefore the first ``state_bytes`` bytes of its page in every layer, and a
chunk's state section (``s3kv.shard``) is those bytes, layer after layer,
zero-padded to a whole number of head-slices.

The same interface as ``s3kv.vllm.kv_layout.KVBlocks`` (``gather``,
``unpack``, ``payload_view``, ``copy_in``), so the save and load paths treat
a state group like any other section; only what a "block" holds differs.
Work is issued on the current stream, as there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from s3kv.errors import ConfigError, IntegrityError
from s3kv.vllm.kv_layout import KVBlocks


def page_view(t: torch.Tensor, state_bytes: int) -> torch.Tensor:
    """``[num_blocks, state_bytes]`` uint8 view of one layer's pages (no copy)."""
    if t.dim() == 4 and t.shape[1] == 1 and t.shape[2] == 1:
        t = t[:, 0, 0]
    if t.dim() != 2 or t.element_size() != 1 or t.shape[1] < state_bytes or t.stride(1) != 1:
        raise ConfigError("kv_cache_layout",
                          f"unsupported SSM state tensor {tuple(t.shape)} {t.dtype} "
                          f"(expected [blocks, 1, 1, >= {state_bytes}] bytes)",
                          choices="vLLM's raw Mamba pages [B, 1, 1, C] int8")
    return t[:, :state_bytes].view(torch.uint8)


class StateBlocks:
    """One KV cache group's per-block states, for the save and load paths.

    ``state_bytes``: bytes of one layer's state per block on this rank;
    ``slice_bytes``: bytes of one head-slice of a section (the section is
    ``heads * slice_bytes``, at least every layer's state)."""

    def __init__(self, caches: Mapping[str, torch.Tensor], state_bytes: int,
                 heads: int) -> None:
        self.names = tuple(caches)
        self.pages = [page_view(t, state_bytes) for t in caches.values()]
        self.state_bytes = state_bytes
        self.total = state_bytes * len(self.pages)
        self.slice_bytes = -(-self.total // heads)
        self.device = self.pages[0].device

    def payload_view(self, buf: torch.Tensor, heads: int, nblocks: int) -> torch.Tensor:
        """A section's bytes as the destination of ``unpack`` (empty: no state)."""
        if nblocks not in (0, 1) or len(buf) != (heads * self.slice_bytes if nblocks else 0):
            raise ValueError(f"a state section holds one state, not {nblocks} "
                             f"({len(buf)} bytes)")
        return buf

    def _index(self, ids: Sequence[int]) -> torch.Tensor:
        idx = torch.tensor(ids, dtype=torch.long)
        if self.device.type == "cpu":
            return idx
        return idx.pin_memory().to(self.device, non_blocking=True)

    def gather(self, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Every listed block's state, ``[blocks, layers * state_bytes]`` on the device."""
        idx = self._index([b for chunk in chunks for b in chunk])
        return torch.cat([p.index_select(0, idx) for p in self.pages], dim=1)

    def unpack(self, gathered: torch.Tensor, sizes: Sequence[int],
               dsts: Sequence[torch.Tensor]) -> None:
        at = 0
        for k, dst in zip(sizes, dsts, strict=True):
            if not k:
                continue
            dst[: self.total].copy_(gathered[at], non_blocking=True)
            dst[self.total:].zero_()
            at += k

    def copy_in(self, src: torch.Tensor, offsets: Sequence[int], block_ids: Sequence[int],
                head_offset: int = 0) -> None:
        """Write the state in ``src`` (a verified section) into ``block_ids[0]``."""
        if list(offsets) != [0] or len(block_ids) != 1 or head_offset \
                or len(src) < self.total:
            raise IntegrityError(f"a state section of {len(src)} bytes cannot fill blocks "
                                 f"{list(block_ids)}")
        src = src[: self.total].reshape(len(self.pages), self.state_bytes)
        if self.device.type != "cpu":
            src = src.to(self.device)
        idx = self._index(block_ids)
        for li, p in enumerate(self.pages):
            p.index_copy_(0, idx, src[li : li + 1])


#: What the save and load paths hold per KV cache group.
GroupCache = KVBlocks | StateBlocks
