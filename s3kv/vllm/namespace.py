"""The namespace fingerprint, filled from the live vLLM config.

Scheduler and workers compute it independently from the same config, so it
must depend only on configuration and on files both can read.

The weights fingerprint hashes ``config.json`` and, for every weight file,
its name, size, safetensors header and 32 windows of 64 KiB spread over the
file. That catches a different checkpoint of the same architecture (a
fine-tune changes nearly every window) without reading hundreds of GB at
start-up. For deployments that swap weights in place, set ``weights_id``
(for example the checkpoint's commit) and it is used instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from pathlib import Path
from typing import Any

from s3kv.config import Settings
from s3kv.errors import ConfigError
from s3kv.keys import Fingerprint

log = logging.getLogger("s3kv.vllm")

_WINDOWS = 32
_WINDOW = 64 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _hash_file(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(n, 16 << 20)))
        for i in range(_WINDOWS):
            f.seek(max(0, (size - _WINDOW) * i // max(1, _WINDOWS - 1)))
            h.update(f.read(_WINDOW))


def weights_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json",):
        p = model_dir / name
        if p.exists():
            h.update(p.read_bytes())
    files = sorted(p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    for p in files:
        _hash_file(h, p)
    return "sampled:" + h.hexdigest()[:32]


def _resolve_model_dir(model: str, revision: str | None) -> Path | None:
    if os.path.isdir(model):
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:
        return None


def kv_dtype(vllm_config: Any) -> str:
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in ("auto", "None"):
        return {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
                "fp8_e5m2": "float8_e5m2"}.get(cache_dtype, cache_dtype)
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


def build_fingerprint(vllm_config: Any, settings: Settings) -> Fingerprint:
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    if pc.pipeline_parallel_size != 1:
        raise ConfigError("pipeline_parallel_size", "s3kv supports pipeline_parallel_size=1 only",
                          choices=[1])
    block_size = int(cc.block_size)
    if settings.chunk_tokens % block_size:
        raise ConfigError(
            "chunk_tokens",
            f"{settings.chunk_tokens} is not a multiple of the block size {block_size}",
            choices=f"multiples of {block_size}",
        )
    weights = settings.weights_id
    if weights is None:
        model_dir = _resolve_model_dir(mc.model, getattr(mc, "revision", None))
        if model_dir is not None:
            weights = weights_fingerprint(model_dir)
        else:
            weights = f"unresolved:{mc.model}@{getattr(mc, 'revision', None)}"
            log.warning("s3kv: cannot read the weights of %s; set weights_id to pin identity",
                        mc.model)
    mla = bool(getattr(mc, "use_mla", False))
    architectures = getattr(mc.hf_config, "architectures", None) or ["unknown"]
    return Fingerprint(
        model=f"{','.join(architectures)}:{os.path.basename(str(mc.model).rstrip('/'))}",
        weights_id=weights,
        dtype=kv_dtype(vllm_config),
        chunk_tokens=settings.chunk_tokens,
        num_layers=int(mc.get_num_layers(pc)),
        # MLA keeps one latent per token, identical on every rank: one "head".
        num_kv_heads=1 if mla else int(mc.get_total_num_kv_heads()),
        head_size=int(mc.get_head_size()),
        attention="mla" if mla else "mha",
        tag=settings.namespace_tag,
    )
