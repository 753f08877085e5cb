"""vLLM's KV cache groups, as s3kv stores them, or a clear refusal at start-up.

With its hybrid KV cache manager (HMA) on, vLLM gives layers that keep their
KV differently separate groups and block tables: full attention keeps every
block, sliding-window attention frees the blocks behind its window, Mamba
keeps one recurrent state per block. s3kv stores each group as a section of
a chunk's shards (``s3kv.groups`` says which tokens). A group kind it cannot
store stops the engine at start-up, naming what to change, rather than
failing a request later inside vLLM.
"""

from __future__ import annotations

from typing import Any

from s3kv.errors import ConfigError
from s3kv.groups import GroupSpec

HMA_FLAG = "--disable-hybrid-kv-cache-manager"


def group_specs(kv_cache_config: Any, block_size: int) -> tuple[GroupSpec, ...]:
    """The engine's KV cache groups as s3kv stores them; ConfigError for a
    group it cannot store (it names the group and the way out)."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        MambaSpec,
        SlidingWindowSpec,
    )

    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if not groups:
        raise ConfigError("kv_cache_config", "the engine has no KV cache groups")
    out = []
    for gid, group in enumerate(groups):
        spec = group.kv_cache_spec
        kind = type(spec).__name__
        where = f"KV cache group {gid} ({kind}, layers {', '.join(group.layer_names[:3])}...)"
        if isinstance(spec, MambaSpec):
            raise ConfigError(
                "kv_cache_groups",
                f"{where}: s3kv does not store SSM / linear-attention state yet; serve "
                "this model without s3kv (remove --kv-transfer-config)",
                choices="full attention, MLA, sliding-window attention")
        if not getattr(group, "enable_kv_transfer", True) or not spec.prefix_cacheable:
            raise ConfigError("kv_cache_groups",
                              f"{where}: vLLM does not offer this group for transfer",
                              choices="full attention, MLA, sliding-window attention")
        if int(spec.block_size) != block_size:
            raise ConfigError(
                "block_size",
                f"{where}: blocks of {spec.block_size} tokens where the engine's are "
                f"{block_size}; s3kv needs one block size for every group (or serve with "
                f"{HMA_FLAG})", choices=[block_size])
        if isinstance(spec, SlidingWindowSpec) and type(spec) is SlidingWindowSpec:
            if getattr(spec, "extra_retained_tokens", 0):
                raise ConfigError(
                    "kv_cache_groups",
                    f"{where}: a window that retains extra tokens (multi-token "
                    f"speculative decoding) is not supported; serve with {HMA_FLAG}",
                    choices="sliding windows without extra retained tokens")
            out.append(GroupSpec("window", tuple(group.layer_names), int(spec.sliding_window)))
        elif isinstance(spec, FullAttentionSpec) and type(spec).__name__ in (
                "FullAttentionSpec", "MLAAttentionSpec"):
            # A full group that also holds window layers (vLLM merges them
            # when HMA is off) keeps every block: stored in full.
            out.append(GroupSpec("full", tuple(group.layer_names)))
        else:
            raise ConfigError(
                "kv_cache_groups",
                f"{where}: s3kv does not store this kind of KV cache group; serve with "
                f"{HMA_FLAG} if vLLM can, or without s3kv",
                choices="full attention, MLA, sliding-window attention")
    return tuple(out)
