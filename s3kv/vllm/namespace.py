"""The namespace fingerprint, filled from the live vLLM config.

Scheduler and workers compute it independently from the same config, so it
must depend only on configuration and on files both can read.

The weights fingerprint hashes ``config.json`` and, for every weight file,
its name, size, safetensors header and 32 windows of 64 KiB spread over the
file. That catches a different checkpoint of the same architecture (a
fine-tune changes nearly every window) without reading hundreds of GB at
start-up. For deployments that swap weights in place, set ``weights_id``
(for example the checkpoint's commit) and it is used instead. Weights that
cannot be identified (no local weight files and no ``weights_id``) are an
error the connector answers by serving without the cache: a guess would let
two checkpoints of one name read each other's KV.

One checkpoint can also compute different KV under different engine
settings (a rope override, another context length for length-dependent rope,
on-the-fly quantization): :func:`engine_settings` collects those into the
fingerprint's ``engine`` field. LoRA adapters are named by content in each
chunk id (:func:`lora_identity`), never by their request name.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import math
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from s3kv.config import Settings
from s3kv.errors import ConfigError, WeightsUnresolved
from s3kv.keys import Fingerprint

log = logging.getLogger("s3kv.vllm")

_WINDOWS = 32
_WINDOW = 64 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
#: The model config files vLLM builds its config from (HF format, Mistral format).
_CONFIG_FILES = ("config.json", "params.json")
#: Read from the live config only when no config file can be (rope and attention span).
_LIVE_ATTRS = (
    "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "rotary_dim",
    "rope_local_base_freq", "rope_local_theta", "max_position_embeddings",
    "original_max_position_embeddings", "dual_chunk_attention_config", "sliding_window",
    "layer_types", "attention_chunk_size",
)
#: Readable values longer than this are shown in namespace.json by digest only
#: (a quantization config can list hundreds of layers; the document stays small).
_READABLE_MAX_CHARS = 4096


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


def weights_fingerprint(model_dir: Path) -> str | None:
    """``sampled:<digest>`` of the weights in ``model_dir``; None without weight files.

    A directory holding only a config (weights streamed from elsewhere, as
    with object-storage loaders) says nothing about the weights: hashing the
    config alone would give two fine-tunes of one config the same identity.
    """
    h = hashlib.sha256()
    for name in ("config.json",):
        p = model_dir / name
        if p.exists():
            h.update(p.read_bytes())
    files = sorted(p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        return None
    for p in files:
        _hash_file(h, p)
    return "sampled:" + h.hexdigest()[:32]


def _single_file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    _hash_file(h, path)
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


# --- engine settings ---------------------------------------------------------------


def _canon(value: Any, depth: int = 0) -> Any:
    """A JSON value that is the same in every process for the same setting.

    Never ``str()`` of an arbitrary object: its default repr carries a memory
    address, and scheduler and workers would compute different namespaces.
    """
    if depth > 32:
        raise ValueError("setting nested too deeply to fingerprint")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, enum.Enum):
        return _canon(value.value, depth + 1)
    if isinstance(value, Mapping):
        return {str(k): _canon(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canon(v, depth + 1) for v in value), key=json.dumps)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canon({f.name: getattr(value, f.name) for f in dataclasses.fields(value)},
                      depth + 1)
    for method in ("to_dict", "model_dump"):
        dump = getattr(value, method, None)
        if callable(dump):
            return _canon(dump(), depth + 1)
    if callable(value):
        # A callable hf_overrides is known by name only: what it does is not
        # readable here. Changing what a named callable does needs a new name
        # or namespace_tag.
        return (f"callable:{getattr(value, '__module__', '?')}."
                f"{getattr(value, '__qualname__', type(value).__qualname__)}")
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(value).__qualname__}:{value}")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _config_files(config_dir: Path | None) -> dict[str, str]:
    if config_dir is None:
        return {}
    out: dict[str, str] = {}
    for name in _CONFIG_FILES:
        try:
            out[name] = _digest((config_dir / name).read_bytes())
        except OSError:
            continue
    return out


def engine_settings(vllm_config: Any, model_dir: Path | None = None) -> dict[str, Any]:
    """Every engine setting that changes the KV values one checkpoint computes.

    The model's config is hashed as the files vLLM builds it from (plus
    ``hf_overrides`` as given) rather than read back from the live config
    object: vLLM's model code rewrites that object while loading the model
    (DeepSeek-V2 renames its rope type, Bailing and Falcon-H1 add a
    ``partial_rotary_factor``), in the worker processes only when TP > 1, so
    the live rope parameters differ between the scheduler and its own
    workers, and between a TP=1 and a TP=2 engine. The files and the
    overrides are the same everywhere, and the resolved rope configuration
    is a function of them. Only when no config file can be read are the live
    rope and attention-span attributes and the checkpoint's quantization
    config used instead (a mismatch there costs misses, never wrong reads).

    ``max_model_len`` is always included. LongRoPE (Phi-3) switches to its
    long factors when ``max_model_len`` exceeds the original context, dynamic
    NTK and Fourier rope scale with the rotary table's length, and several
    models size that table from ``max_model_len`` (Nomic, PLaMo 3); which
    rope type a model ends up with is only known after vLLM's model code ran
    (above), so a per-type rule could differ between processes. Engines with
    different context lengths then do not share chunks: a miss, never a
    wrong token.

    Left out on purpose: what changes only the layout or the arithmetic
    order (TP size, block size, attention backend), as the cache already
    maps those; and the KV dtype, already a fingerprint field.
    """
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    config_path = getattr(mc, "hf_config_path", None)
    config_dir = model_dir
    if config_path:
        config_dir = _resolve_model_dir(str(config_path), getattr(mc, "revision", None))
    settings: dict[str, Any] = {
        "max_model_len": int(mc.max_model_len),
        "dtype": str(mc.dtype).removeprefix("torch."),
        "hf_overrides": _canon(getattr(mc, "hf_overrides", None) or None),
        "quantization": _canon(getattr(mc, "quantization", None)),
        "quantization_config": _canon(getattr(mc, "quantization_config", None)),
        "disable_sliding_window": bool(getattr(mc, "disable_sliding_window", False)),
        "kv_cache_dtype_skip_layers": sorted(
            str(x) for x in (getattr(cc, "kv_cache_dtype_skip_layers", None) or ())),
        "model_class_overrides": _canon(getattr(mc, "model_class_overrides", None) or None),
    }
    files = _config_files(config_dir)
    if files:
        settings["config_files"] = files  # rope, sliding window, the checkpoint's quantization
    else:
        text = mc.hf_text_config
        settings["live_config"] = {a: _canon(getattr(text, a)) for a in _LIVE_ATTRS
                            if getattr(text, a, None) is not None}
        settings["hf_quantization_config"] = _canon(
            getattr(mc.hf_config, "quantization_config", None)
            or getattr(text, "quantization_config", None))
    load_format = str(getattr(getattr(vllm_config, "load_config", None), "load_format", ""))
    if load_format == "dummy":  # random weights: not the files the weights id names
        settings["load_format"] = load_format
    # Unset settings are left out, so that adding one later keeps today's namespaces.
    return {k: v for k, v in settings.items() if v is not None and v is not False
            and v != [] and v != {}}


def _canonical_json(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _readable(settings: Mapping[str, Any]) -> str:
    """The settings for namespace.json, large values replaced by their digest."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        text = _canonical_json({key: value})
        out[key] = ("sha256:" + _digest(text.encode())) if len(text) > _READABLE_MAX_CHARS \
            else value
    return _canonical_json(out)


# --- the fingerprint ---------------------------------------------------------------


def build_fingerprint(vllm_config: Any, settings: Settings) -> Fingerprint:
    """The engine's namespace fingerprint.

    Raises :class:`WeightsUnresolved` when no ``weights_id`` is set and the
    weights cannot be fingerprinted; the connector then serves without the
    cache (both roles reach the same verdict from the same config and files).
    """
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
    path = Path(str(mc.model))
    single_file = path if path.suffix in _WEIGHT_SUFFIXES and path.is_file() else None
    model_dir = None if single_file else _resolve_model_dir(mc.model, getattr(mc, "revision", None))
    weights = settings.weights_id
    if weights is None:
        try:
            if single_file is not None:  # a GGUF file: its config comes from elsewhere
                weights = _single_file_fingerprint(single_file)
            elif model_dir is None:
                raise WeightsUnresolved(str(mc.model), "no local copy of the model to fingerprint")
            else:
                weights = weights_fingerprint(model_dir)
        except OSError as exc:
            raise WeightsUnresolved(str(mc.model), f"cannot read its files: {exc}") from exc
        if weights is None:
            raise WeightsUnresolved(str(mc.model), f"no weight files in {model_dir}")
    engine = engine_settings(vllm_config, model_dir)
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
        engine=_digest(_canonical_json(engine).encode()),
        engine_settings=_readable(engine),
    )


# --- LoRA adapters -----------------------------------------------------------------

_LORA_CACHE_ITEMS = 1024
#: An adapter not found is asked for again after this long (the engine may
#: still be downloading it); until then its requests are simply not cached.
_LORA_RETRY_S = 30.0
_lora_lock = threading.Lock()
_lora_known: OrderedDict[str, str] = OrderedDict()
_lora_missing: dict[str, float] = {}


def _resolve_lora_dir(path: str) -> Path | None:
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return Path(local)
    if os.path.isabs(local) or os.path.exists(local):
        return None
    return _resolve_model_dir(path, None)  # a hub id: only what is already downloaded


def _hash_adapter(directory: Path) -> str | None:
    try:
        h = hashlib.sha256()
        h.update((directory / "adapter_config.json").read_bytes())
        files = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        if not files:
            return None
        for p in files:
            _hash_file(h, p)
    except OSError:
        return None
    return "lora:" + h.hexdigest()[:32]


def lora_identity(lora_request: Any) -> str | None:
    """A content digest of a LoRA adapter's files, or None if they cannot be read.

    An adapter's name is chosen per request: two adapters under one name
    (a retrained version, another tenant's) compute different KV, and one
    adapter under two names computes the same. The digest covers
    ``adapter_config.json`` and every weight file the way the model's
    weights are sampled. Digests are remembered per path (LRU), so only the
    first request of an adapter reads its files; requests with
    ``load_inplace`` (vLLM reloads the files for them) are hashed afresh.
    """
    path = str(getattr(lora_request, "lora_path", "") or getattr(lora_request, "local_path", "")
               or "")
    if not path:
        return None
    inplace = bool(getattr(lora_request, "load_inplace", False))
    now = time.monotonic()
    with _lora_lock:
        if not inplace:
            known = _lora_known.get(path)
            if known is not None:
                _lora_known.move_to_end(path)
                return known
            if now < _lora_missing.get(path, 0.0):
                return None
    directory = _resolve_lora_dir(path)
    ident = _hash_adapter(directory) if directory is not None else None
    with _lora_lock:
        if ident is None:
            if len(_lora_missing) >= _LORA_CACHE_ITEMS:
                for p in [p for p, t in _lora_missing.items() if t <= now]:
                    del _lora_missing[p]
                if len(_lora_missing) >= _LORA_CACHE_ITEMS:
                    _lora_missing.clear()
            _lora_missing[path] = now + _LORA_RETRY_S
            log.warning("s3kv: cannot read LoRA adapter %s; its requests are not cached", path)
        else:
            _lora_missing.pop(path, None)
            _lora_known[path] = ident
            _lora_known.move_to_end(path)
            while len(_lora_known) > _LORA_CACHE_ITEMS:
                _lora_known.popitem(last=False)
    return ident
