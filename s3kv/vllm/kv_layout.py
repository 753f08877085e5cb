"""Per-layer block views of vLLM's KV cache and the copies in and out of it.

Every supported layout is exposed as one view per layer shaped
``[num_blocks, heads, block_size, *token_shape]`` with keys before values
inside a token (``token_shape`` is ``[2, D]`` or ``[2*D]``; for MLA ``[C]``
with one "head", the latent shared by every rank). A chunk's payload is
``[heads, layers, blocks, block_size, *token_shape]``, which is the shard
format's token-major ``[heads, layers, tokens, token_elems]`` whatever the
block size. One gather per layer moves a step's chunks out, one indexed copy
per layer moves a chunk in, on CPU as on GPU (the same code). Which stream
each part runs on is the caller's choice (``s3kv.vllm.saver``,
``s3kv.vllm.loader``): this module only issues work on the current one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from s3kv.errors import ConfigError

LAYOUTS = ("[B,H,N,C]", "[2,B,N,H,D]", "[B,2,N,H,D]", "[B,2,H,N,D]", "MLA [B,N,C]",
           "MLA [B,1,N,C]")


def block_view(t: torch.Tensor, num_blocks: int, heads: int, block_size: int,
               mla: bool = False) -> torch.Tensor:
    """``[num_blocks, heads, block_size, *token_shape]`` view of one layer, without copying.

    Shapes are vLLM's logical ones (``get_kv_cache_shape``); a backend's
    physical stride order (NHD or HND) is already folded into the strides.
    """
    shape = tuple(t.shape)
    if mla:
        # The GPU MLA backends: [B, N, C], C = kv_lora_rank + qk_rope_head_dim;
        # vLLM's CPU MLA backend: [B, 1, N, C].
        if heads == 1 and shape[0] == num_blocks:
            if len(shape) == 3 and shape[1] == block_size:
                return t.unsqueeze(1)
            if len(shape) == 4 and shape[1] == 1 and shape[2] == block_size:
                return t
    # vLLM's logical per-layer layout [B, H, N, C] (every backend since 0.32; the
    # KVCacheLayout's physical order is in the strides).
    elif len(shape) == 4 and shape[0] == num_blocks and shape[1] == heads \
            and shape[2] == block_size:
        return t
    # FlashAttention-style [2, B, N, H, D] -> [B, H, N, 2, D].
    elif len(shape) == 5 and shape[0] == 2 and shape[1] == num_blocks \
            and shape[2] == block_size and shape[3] == heads:
        return t.permute(1, 3, 2, 0, 4)
    # [B, 2, N, H, D] (NHD) -> [B, H, N, 2, D]; [B, 2, H, N, D] (HND) -> [B, H, N, 2, D].
    elif len(shape) == 5 and shape[0] == num_blocks and shape[1] == 2:
        if shape[2] == block_size and shape[3] == heads:
            return t.permute(0, 3, 2, 1, 4)
        if shape[2] == heads and shape[3] == block_size:
            return t.permute(0, 2, 3, 1, 4)
    raise ConfigError(
        "kv_cache_layout",
        f"unsupported {'MLA ' if mla else ''}KV cache tensor shape {shape} "
        f"(blocks={num_blocks}, heads={heads}, block_size={block_size})",
        choices=", ".join(LAYOUTS),
    )


def _memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s dimensions from the largest stride to the smallest: the order its
    elements lie in memory (``t.permute(*order)`` is contiguous for any
    permutation of a contiguous allocation)."""
    strides = t.stride()
    return tuple(sorted(range(t.dim()), key=lambda d: (-strides[d], d)))


class KVBlocks:
    """A layer-by-layer view of the KV cache and the copies between it and payloads.

    ``token_map``: for a backend whose kernel packs each (block, head) slab in
    its own order (vLLM's CPU attention, ``s3kv.vllm.cpu_layout``), the slab
    offset of each canonical position (token, K/V, element). Copies then
    gather and scatter through it, so payloads stay token-major.
    """

    def __init__(
        self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int, heads: int, block_size: int,
        mla: bool = False, token_map: torch.Tensor | None = None,
    ) -> None:
        self.names = tuple(kv_caches)
        self.views = [block_view(t, num_blocks, heads, block_size, mla)
                      for t in kv_caches.values()]
        first = self.views[0]
        self.block_shape = tuple(first.shape[2:])
        self.token_map: torch.Tensor | None = None
        if token_map is not None:
            slab = math.prod(self.block_shape)
            if token_map.shape != (slab,) or any(
                    v.dim() != 4 or v.stride(3) != 1 or v.stride(2) != v.shape[3]
                    for v in self.views):
                raise ConfigError("kv_cache_layout",
                                  f"a token map of {tuple(token_map.shape)} does not fit blocks "
                                  f"of {self.block_shape}")
            # Whole slabs per (block, head): [B, H, N*C], gathered through the map.
            self.views = [v.flatten(2) for v in self.views]
            self.token_map = token_map.to(first.device)
        self.dtype = first.dtype
        self.device = first.device
        for name, v in zip(self.names, self.views, strict=True):
            if tuple(v.shape) != tuple(self.views[0].shape) or v.dtype != self.dtype:
                raise ConfigError("kv_cache_layout", f"layer {name} differs from the first layer")
        # Gathers walk each layer in its memory order (see gather()).
        self._order = _memory_order(self.views[0])
        self._block_pos = self._order.index(0)
        self._memory_views = [v.permute(*self._order) for v in self.views]
        self._to_blocks_first = tuple(1 + self._order.index(d) for d in range(self.views[0].dim()))

    @property
    def token_elems(self) -> int:
        """Elements of one token, per head and layer (``2 * head_size``, or the MLA latent)."""
        return math.prod(self.block_shape[1:])

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def payload_view(self, buf: torch.Tensor, heads: int, nblocks: int) -> torch.Tensor:
        """Interpret a flat uint8 host tensor as ``[heads, layers, blocks, *block_shape]``."""
        return buf.view(self.dtype).view(heads, len(self.views), nblocks, *self.block_shape)

    def section_view(self, buf: torch.Tensor, heads: int, tokens: int) -> torch.Tensor:
        """Interpret a flat uint8 host tensor as ``[heads, layers, tokens, *token_shape]``:
        a group's section of a chunk from its start token (``s3kv.shard``)."""
        return buf.view(self.dtype).view(heads, len(self.views), tokens, *self.block_shape[1:])

    def _index(self, ids: Sequence[int]) -> torch.Tensor:
        """Block ids as a device tensor, without a host wait.

        ``torch.tensor(ids, device=cuda)`` copies from pageable memory and then
        synchronizes the current stream, which on the side stream means
        waiting for the whole queued forward pass; a pinned, non-blocking copy
        does not.
        """
        idx = torch.tensor(ids, dtype=torch.long)
        if self.device.type == "cpu":
            return idx
        return idx.pin_memory().to(self.device, non_blocking=True)

    def gather(self, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Every chunk's blocks, ``[layers, blocks, heads, *block_shape]`` on the cache's
        device, read on the current stream: one ``index_select`` per layer for all
        chunks of the call (the per-layer launches are what costs host time on
        GPU, so they are paid once per call, not once per chunk).

        Each layer is read in its memory order (vLLM's FlashAttention cache is
        ``[2, blocks, tokens, heads, D]`` in memory): a gather along the block
        axis of that order reads and writes whole runs of contiguous memory,
        where one on the ``[blocks, heads, ...]`` view would walk five strided
        axes per element. The result is a view of that buffer, permuted to
        blocks first; ``unpack`` moves it into payload order.
        """
        ids = [b for chunk in chunks for b in chunk]
        idx = self._index(ids)
        shape = list(self._memory_views[0].shape)
        shape[self._block_pos] = len(ids)
        buf = torch.empty((len(self.views), *shape), dtype=self.dtype, device=self.device)
        for li, v in enumerate(self._memory_views):
            torch.index_select(v, self._block_pos, idx, out=buf[li])
        gathered = buf.permute(0, *self._to_blocks_first)
        if self.token_map is not None:  # slab order -> canonical, every layer at once
            gathered = gathered.index_select(3, self.token_map).view(
                *gathered.shape[:3], *self.block_shape)
        return gathered

    def unpack(self, gathered: torch.Tensor, sizes: Sequence[int],
               dsts: Sequence[torch.Tensor]) -> None:
        """Copy ``gathered`` (from ``gather``), ``sizes[i]`` blocks per chunk, into each
        chunk's payload ``[heads, layers, blocks, *block_shape]``.

        One copy per chunk into its contiguous host payload: on GPU a single
        asynchronous copy into pinned memory (PyTorch puts the permuted source
        in a contiguous device temporary first, on the current stream).
        Copying each layer straight into its strided slice of host memory
        would make PyTorch stage it through pageable memory, which blocks the
        calling thread until the stream gets there.
        """
        start = 0
        for k, dst in zip(sizes, dsts, strict=True):
            part = gathered[:, start : start + k]  # [layers, k, heads, ...]
            dst.copy_(part.transpose(0, 2).transpose(1, 2), non_blocking=True)
            start += k

    def copy_out(self, chunks: Sequence[Sequence[int]], dsts: Sequence[torch.Tensor]) -> None:
        """Copy each chunk's blocks into its payload ``[heads, layers, blocks, *block_shape]``,
        all on the current stream (``gather`` then ``unpack``)."""
        if not any(chunks):
            return
        self.unpack(self.gather(chunks), [len(c) for c in chunks], dsts)

    def copy_in(self, src: torch.Tensor, offsets: Sequence[int], block_ids: Sequence[int],
                head_offset: int = 0) -> None:
        """Copy blocks ``offsets`` of ``src`` (host payload, ``[h, layers, blocks, ...]``)
        into ``block_ids``, heads ``[head_offset, head_offset + h)`` of this rank's.

        On GPU the payload crosses to the device once, whole and contiguous;
        blocks are then picked out on the device.
        """
        idx = self._index(block_ids)
        if self.device.type == "cpu":
            sel = torch.tensor(offsets, dtype=torch.long)
        else:
            src = src.to(self.device)
            sel = self._index(offsets)
        h = src.shape[0]
        for li, v in enumerate(self.views):
            part = src[:, li].index_select(1, sel).transpose(0, 1)  # [k, h, *block_shape]
            if self.token_map is not None:  # canonical -> the kernel's slab order
                flat = part.reshape(part.shape[0], h, -1)
                part = torch.empty_like(flat).index_copy_(2, self.token_map, flat)
            v[:, head_offset : head_offset + h].index_copy_(0, idx, part)
