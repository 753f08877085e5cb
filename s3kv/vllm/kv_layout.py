"""Per-layer block views of vLLM's KV cache and the copies in and out of it.

Every supported layout is exposed as one view per layer shaped
``[num_blocks, heads, block_size, *token_shape]`` with keys before values
inside a token (``token_shape`` is ``[2, D]`` or ``[2*D]``; for MLA ``[C]``
with one "head", the latent shared by every rank). A chunk's payload is
``[heads, layers, blocks, block_size, *token_shape]``, which is the shard
format's token-major ``[heads, layers, tokens, token_elems]`` whatever the
block size. One gather per layer moves a step's chunks out, one indexed copy
per layer moves a chunk in, on CPU as on GPU (the same code; on GPU the
copy-out runs on a side stream into pinned memory, loads on their own stream).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from s3kv.errors import ConfigError

#: Where a ``[B, H, N, C]`` backend keeps K and V inside ``C``'s block: "token"
#: (each token's row is K then V; vLLM's GPU backends split the last dim) or
#: "block" (vLLM's CPU attention reads a block as [K of every token; V of every
#: token], a view of [H, 2N, D] chunked in two along the token axis).
KVOrder = Literal["token", "block"]

LAYOUTS = ("[B,H,N,C]", "[2,B,N,H,D]", "[B,2,N,H,D]", "[B,2,H,N,D]", "MLA [B,N,C]",
           "MLA [B,1,N,C]")


def block_view(t: torch.Tensor, num_blocks: int, heads: int, block_size: int,
               mla: bool = False, kv_order: KVOrder = "token") -> torch.Tensor:
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
        if kv_order == "token":
            return t
        if shape[3] % 2 == 0 and t.stride(3) == 1 and t.stride(2) == shape[3]:
            # [B, H, 2, N, D] in memory -> [B, H, N, 2, D], token-major like the rest.
            d = shape[3] // 2
            return t.as_strided((shape[0], shape[1], 2, block_size, d),
                                (t.stride(0), t.stride(1), block_size * d, d, 1),
                                t.storage_offset()).permute(0, 1, 3, 2, 4)
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


class KVBlocks:
    def __init__(
        self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int, heads: int, block_size: int,
        mla: bool = False, kv_order: KVOrder = "token",
    ) -> None:
        self.names = tuple(kv_caches)
        self.views = [block_view(t, num_blocks, heads, block_size, mla, kv_order)
                      for t in kv_caches.values()]
        first = self.views[0]
        self.block_shape = tuple(first.shape[2:])
        self.dtype = first.dtype
        self.device = first.device
        for name, v in zip(self.names, self.views, strict=True):
            if tuple(v.shape[2:]) != self.block_shape or v.dtype != self.dtype:
                raise ConfigError("kv_cache_layout", f"layer {name} differs from the first layer")

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

    def copy_out(self, chunks: Sequence[Sequence[int]], dsts: Sequence[torch.Tensor]) -> None:
        """Copy each chunk's blocks into its payload ``[heads, layers, blocks, *block_shape]``.

        The same code on CPU and GPU. Every chunk of the call is gathered with
        one ``index_select`` per layer into a device buffer ``[layers, blocks,
        heads, ...]`` (the per-layer launches are what costs host time on
        GPU, so they are paid once per call), then each chunk moves with one
        copy into its contiguous host payload: on GPU a single asynchronous
        copy into pinned memory (PyTorch puts the permuted source in a
        contiguous device temporary first). Copying each layer straight into
        its strided slice of host memory would make PyTorch stage it through
        pageable memory, which blocks the calling thread until the stream
        gets there.
        """
        ids = [b for chunk in chunks for b in chunk]
        if not ids:
            return
        idx = self._index(ids)
        gathered = torch.empty((len(self.views), len(ids), *self.views[0].shape[1:]),
                               dtype=self.dtype, device=self.device)
        for li, v in enumerate(self.views):
            torch.index_select(v, 0, idx, out=gathered[li])
        start = 0
        for chunk, dst in zip(chunks, dsts, strict=True):
            part = gathered[:, start : start + len(chunk)]  # [layers, k, heads, ...]
            dst.copy_(part.transpose(0, 2).transpose(1, 2), non_blocking=True)
            start += len(chunk)

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
            v[:, head_offset : head_offset + h].index_copy_(0, idx, part)
