"""Engine settings that change the KV bytes a checkpoint computes are in the namespace.

A writer started with a setting and a reader without it must never share
chunks. One real writer/reader pair checks that end to end for a rope
override (the case seen reading wrong tokens); every other setting is checked
on the namespace of a real ``VllmConfig`` (vLLM's ``EngineArgs``, no engine
started): a different namespace is a different key prefix, so zero hits by
construction. Settings that do not change the bytes (TP size, block size)
must keep the namespace, or engines would stop sharing for nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from safetensors.numpy import save_file

from s3kv.config import parse_settings
from s3kv.errors import WeightsUnresolved
from s3kv.keys import KeyLayout
from s3kv.vllm.namespace import build_fingerprint, lora_identity
from tests.vllm.harness import bucket_keys, job, run_engine

pytestmark = [pytest.mark.vllm]
BUCKET = "settings-check"
ROPE_100 = {"rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}

Config = Callable[..., Any]


@pytest.fixture(scope="module")
def config(tiny_model: Path) -> Config:
    """A real VllmConfig for the tiny model with these EngineArgs changed."""
    from vllm.engine.arg_utils import EngineArgs

    def make(**changes: Any) -> Any:
        args: dict[str, Any] = dict(model=str(tiny_model), dtype="bfloat16", enforce_eager=True,
                                    max_model_len=4096, block_size=128, skip_tokenizer_init=True)
        args.update(changes)
        return EngineArgs(**args).create_engine_config()

    return make


def namespace(vllm_config: Any, **extra: Any) -> str:
    return build_fingerprint(vllm_config, parse_settings({"bucket": BUCKET, **extra})).namespace


def settings_of(vllm_config: Any) -> dict[str, Any]:
    fp = build_fingerprint(vllm_config, parse_settings({"bucket": BUCKET}))
    doc: dict[str, Any] = json.loads(fp.document())["engine_settings"]
    return doc


# --- one setting at a time, on real configs -------------------------------------------


def test_rope_override_changes_the_namespace(config: Config) -> None:
    base, rope = config(), config(hf_overrides=ROPE_100)
    assert rope.model_config.hf_text_config.rope_parameters["rope_theta"] == 100.0
    assert base.model_config.hf_text_config.rope_parameters["rope_theta"] != 100.0
    assert namespace(rope) != namespace(base)
    assert namespace(rope) == namespace(config(hf_overrides=ROPE_100))  # deterministic
    assert settings_of(rope)["hf_overrides"] == ROPE_100


def test_any_hf_override_changes_the_namespace(config: Config) -> None:
    eps = config(hf_overrides={"rms_norm_eps": 1e-3})
    assert eps.model_config.hf_text_config.rms_norm_eps == 1e-3
    assert namespace(eps) != namespace(config())


def test_rope_edited_in_config_json_changes_the_namespace_under_a_pinned_weights_id(
    config: Config, tiny_model: Path, tmp_path: Path,
) -> None:
    """``weights_id`` pins the weights, not the config: a checkpoint copy whose
    config.json sets another rope base computes other KV from the same weights."""
    edited = tmp_path / "edited" / tiny_model.name  # same directory name: same model field
    edited.mkdir(parents=True)
    for f in tiny_model.iterdir():
        if f.name != "config.json":
            (edited / f.name).symlink_to(f)
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["rope_theta"] = 100.0
    cfg.pop("rope_parameters", None)
    cfg.pop("rope_scaling", None)
    (edited / "config.json").write_text(json.dumps(cfg))
    edited_config = config(model=str(edited))
    assert edited_config.model_config.hf_text_config.rope_parameters["rope_theta"] == 100.0
    assert (namespace(edited_config, weights_id="ckpt-1")
            != namespace(config(), weights_id="ckpt-1"))


def test_max_model_len_changes_the_namespace(config: Config) -> None:
    short = config(max_model_len=2048)
    assert short.model_config.max_model_len == 2048
    assert namespace(short) != namespace(config())
    assert settings_of(short)["max_model_len"] == 2048


def test_quantization_method_changes_the_namespace(config: Config) -> None:
    fp8, int8 = config(quantization="fp8"), config(quantization="experts_int8")
    assert fp8.model_config.quantization == "fp8"
    assert len({namespace(fp8), namespace(int8), namespace(config())}) == 3
    assert settings_of(fp8)["quantization"] == "fp8"


def test_model_dtype_changes_the_namespace_even_at_one_kv_dtype(config: Config) -> None:
    """With an fp8 KV cache both engines store fp8, computed from other values."""
    bf16 = config(kv_cache_dtype="fp8")
    fp16 = config(kv_cache_dtype="fp8", dtype="float16")
    assert bf16.cache_config.cache_dtype == fp16.cache_config.cache_dtype == "fp8"
    assert namespace(bf16) != namespace(fp16)


def test_layout_settings_keep_the_namespace(config: Config) -> None:
    base = namespace(config())
    assert namespace(config(tensor_parallel_size=2)) == base
    assert namespace(config(block_size=256)) == base
    assert namespace(config(enable_prefix_caching=False)) == base


# --- weights that cannot be identified --------------------------------------------------


def test_unresolved_weights_turn_the_cache_off_in_both_roles(
    config: Config, tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A model directory with a config and no weight files (weights streamed from
    object storage, say): nothing identifies the weights, so nothing is cached."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from s3kv.vllm.connector import S3KVConnector
    from s3kv.vllm.metadata import S3KVMetadata

    bare = tmp_path / tiny_model.name
    bare.mkdir()
    shutil.copy(tiny_model / "config.json", bare / "config.json")
    ktc = {"kv_connector": "S3KVConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"bucket": BUCKET}}
    vc = config(model=str(bare), kv_transfer_config=ktc)
    with pytest.raises(WeightsUnresolved, match="weights_id"):
        build_fingerprint(vc, parse_settings({"bucket": BUCKET}))
    # Pinning the identity is the fix the message names.
    assert namespace(vc, weights_id="ckpt-1")

    caplog.set_level(logging.DEBUG, logger="s3kv")
    sched = S3KVConnector(vc, KVConnectorRole.SCHEDULER, cast(Any, None))
    worker = S3KVConnector(vc, KVConnectorRole.WORKER, cast(Any, None))
    for conn in (sched, worker):
        assert conn.fingerprint is None
        # Neither role built its side: each hook answers as an engine without
        # a connector. A scheduler side would read the request (a bare object
        # here), a worker side this step's metadata (none is bound).
        assert conn.get_num_new_matched_tokens(cast(Any, object()), 0) == (0, False)
        conn.start_load_kv(None)
        conn.wait_for_save()
        assert conn.get_block_ids_with_load_errors() == set()
        assert conn.build_connector_worker_meta() is None
        assert conn.flush(0.0) is True
    meta = sched.build_connector_meta(cast(Any, object()))
    assert isinstance(meta, S3KVMetadata)
    assert worker.get_finished(set()) == (None, None)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name.startswith("s3kv")]
    assert len(warnings) == 1
    assert "weights_id" in warnings[0].getMessage()
    assert "WITHOUT the cache" in warnings[0].getMessage()


# --- LoRA adapters: known by content ----------------------------------------------------


def _adapter(path: Path, seed: int) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
         "peft_type": "LORA"}, sort_keys=True))
    rng = np.random.default_rng(seed)
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight":
               rng.standard_normal((8, 256), dtype=np.float32)},
              str(path / "adapter_model.safetensors"))
    return path


def _lora(name: str, path: Path, **kw: Any) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=1, lora_path=str(path), **kw)


def test_lora_identity_is_the_adapters_content(tmp_path: Path) -> None:
    a = _adapter(tmp_path / "a", seed=1)
    b = _adapter(tmp_path / "b", seed=2)
    a_copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, a_copy)
    ident_a, ident_b = lora_identity(_lora("tenant", a)), lora_identity(_lora("tenant", b))
    assert ident_a is not None and ident_b is not None
    assert ident_a != ident_b  # one name, two adapters
    assert lora_identity(_lora("other-name", a_copy)) == ident_a  # one adapter, two names
    assert lora_identity(_lora("missing", tmp_path / "nowhere")) is None


def test_lora_identity_reads_an_adapters_files_once(tmp_path: Path) -> None:
    a = _adapter(tmp_path / "a", seed=3)
    first = lora_identity(_lora("x", a))
    assert first is not None
    _adapter(tmp_path / "b", seed=4)
    shutil.rmtree(a)
    shutil.move(tmp_path / "b", a)  # other weights, same path
    assert lora_identity(_lora("x", a)) == first  # remembered, not read again
    # vLLM reloads an adapter's files for load_inplace requests: so is it hashed.
    reloaded = lora_identity(_lora("x", a, load_inplace=True))
    assert reloaded is not None and reloaded != first


# --- end to end: a rope-overridden writer, a default reader -----------------------------


@pytest.mark.slow
def test_rope_overridden_writer_and_default_reader_share_nothing(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]],
    conn: dict[str, Any], s3: Any, bucket: str,
) -> None:
    writer = run_engine(job(tiny_model, prompts, conn, llm_kwargs={"hf_overrides": ROPE_100}))
    assert writer.namespace is not None
    doc = json.loads(s3.get_object(Bucket=bucket, Key=KeyLayout("s3kv").namespace_doc(
        writer.namespace))["Body"].read())
    assert doc["engine_settings"]["hf_overrides"] == ROPE_100  # the override was in effect
    assert any(k.endswith("/manifest.json") for k in bucket_keys(s3, bucket))

    reader = run_engine(job(tiny_model, prompts, conn))
    assert reader.namespace != writer.namespace
    assert reader.counters["lookups"] >= len(prompts)
    assert reader.counters.get("hit_chunks", 0) == 0
    assert reader.counters.get("hit_tokens", 0) == 0
    assert reader.outputs == baseline_tp1


def test_requests_are_keyed_by_their_adapters_content_or_not_cached(tmp_path: Path) -> None:
    """The scheduler side keys a LoRA request's chunks by the adapter's content:
    one name over two adapters asks for two different chunks; an adapter whose
    files cannot be read is never looked up (nor saved)."""
    from s3kv.index import CacheIndex
    from s3kv.stats import Counters
    from s3kv.vllm.scheduler_side import SchedulerSide
    from tests.unit.test_lookup_interleavings import (
        BS,
        FP,
        PROMPTS,
        SETTINGS,
        FakeRequest,
        GatedStore,
        SteppedLoop,
    )

    io, store, counters = SteppedLoop(), GatedStore(), Counters()
    try:
        sched = SchedulerSide(SETTINGS, FP, BS, can_load=True, can_save=True, counters=counters,
                              index=CacheIndex(SETTINGS, FP, counters, store, io))
        asked: list[list[str]] = []
        for i, adapter in enumerate([_adapter(tmp_path / "a", 1), _adapter(tmp_path / "b", 2),
                                     tmp_path / "unreadable"]):
            req = FakeRequest(f"r{i}", list(PROMPTS[0]), lora_request=_lora("tenant", adapter))
            before = {k for k, _ in store.waiting}
            got = sched.get_num_new_matched_tokens(req, 0)  # type: ignore[arg-type]
            io.settle()
            asked.append(sorted({k for k, _ in store.waiting} - before))
            assert got == ((None, False) if i < 2 else (0, False))
        assert asked[0] and asked[1] and asked[0] != asked[1]  # two adapters, two chunk chains
        assert asked[2] == [] and counters.get("lookups") == 2  # unreadable: never asked
    finally:
        io.close()
