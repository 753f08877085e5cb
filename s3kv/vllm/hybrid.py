"""vLLM's KV cache groups, as s3kv stores them, or a clear refusal at start-up.

With its hybrid KV cache manager (HMA) on, vLLM gives layers that keep their
KV differently separate groups and block tables: full attention keeps every
block, sliding-window attention frees the blocks behind its window, Mamba
keeps one recurrent state per block ("align" mode: the state after each
block boundary a step ended on). s3kv stores each group as a section of
a chunk's shards (``s3kv.groups`` says which tokens). A group kind it cannot
store stops the engine at start-up, naming what to change, rather than
failing a request later inside vLLM.
"""

from __future__ import annotations

from typing import Any

from s3kv.errors import ConfigError
from s3kv.groups import Checkpoints, GroupSpec

HMA_FLAG = "--disable-hybrid-kv-cache-manager"


def group_specs(kv_cache_config: Any, block_size: int, tp_size: int = 1
                ) -> tuple[GroupSpec, ...]:
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
            out.append(_state_group(where, group, spec, block_size, tp_size))
            continue
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
    if all(g.kind == "state" for g in out):
        raise ConfigError("kv_cache_groups", "the model has no attention layers; s3kv keys "
                          "and shards chunks by attention heads, so serve it without s3kv",
                          choices="models with at least one attention layer")
    return tuple(out)


def _state_group(where: str, group: Any, spec: Any, block_size: int, tp_size: int
                 ) -> GroupSpec:
    """An SSM / linear-attention group, stored as the state at chunk ends
    (``s3kv.groups``); only vLLM's "align" mode keeps those states."""
    mode = getattr(spec, "mamba_cache_mode", "none")
    if mode != "align":
        raise ConfigError(
            "mamba_cache_mode",
            f"{where}: vLLM keeps SSM states at block boundaries only in 'align' mode "
            f"(this engine: {mode!r}); serve with prefix caching on and "
            "--mamba-cache-mode align", choices=["align"])
    if getattr(spec, "num_speculative_blocks", 0):
        raise ConfigError(
            "speculative_config",
            f"{where}: speculative decoding moves SSM states between blocks; s3kv stores "
            "them only without it", choices="no speculative decoding with SSM layers")
    if int(spec.block_size) != block_size:
        raise ConfigError(
            "block_size",
            f"{where}: states every {spec.block_size} tokens where the engine's blocks hold "
            f"{block_size}; s3kv needs one block size for every group", choices=[block_size])
    state = "+".join(f"{str(d).removeprefix('torch.')}{list(sh)}"
                     for sh, d in zip(spec.shapes, spec.dtypes, strict=True))
    kind = str(getattr(spec.mamba_type, "name", spec.mamba_type)).lower()
    return GroupSpec("state", tuple(group.layer_names),
                     state_bytes=int(spec.state_content_size_bytes),
                     state_shape=f"{kind}:{state}:tp{tp_size}")



def check_state_sharding(groups: tuple[GroupSpec, ...], num_kv_heads: int, attention: str,
                         tp_size: int) -> None:
    """Each rank stores its own part of an SSM state in its own shard, so each
    rank must own a shard: ranks that share KV heads (more ranks than KV
    heads, or MLA's one latent) upload one shard between them."""
    if not any(g.kind == "state" for g in groups):
        return
    if attention == "mla" or num_kv_heads < tp_size:
        raise ConfigError(
            "tensor_parallel_size",
            f"with SSM layers every rank stores its own shard, but {tp_size} ranks share "
            f"{'one MLA latent' if attention == 'mla' else f'{num_kv_heads} KV heads'}",
            choices=f"at most {1 if attention == 'mla' else num_kv_heads}")


def state_checkpoints(vllm_config: Any, kv_cache_config: Any) -> Checkpoints | None:
    """Where the engine's Mamba groups also write a state inside a step (their
    internal prefill checkpoints, ``s3kv.groups.Checkpoints``); None if they
    write none, or if the engine does not say how (then only states at step
    ends are stored: fewer hits, never a wrong state)."""
    from vllm.v1.kv_cache_interface import MambaSpec

    specs = [g.kv_cache_spec for g in getattr(kv_cache_config, "kv_cache_groups", None) or []
             if isinstance(g.kv_cache_spec, MambaSpec)]
    cache = vllm_config.cache_config
    hash_block = getattr(cache, "hash_block_size", None)
    hit_alignment = getattr(cache, "cache_hit_alignment_tokens", None)
    alignments = {(int(getattr(s, "num_prefill_checkpoint_blocks", 0) or 0) > 0,
                   getattr(s, "prefill_checkpoint_alignment", None)) for s in specs}
    if not specs or not hash_block or not hit_alignment or len(alignments) != 1:
        return None
    enabled, alignment = alignments.pop()
    if not enabled or not alignment:
        return None
    return Checkpoints(int(hash_block), int(hit_alignment), int(alignment))
