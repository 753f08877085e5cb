from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest

from s3kv.capacity import (
    DTYPE_BYTES,
    PRICES,
    Dtype,
    InputError,
    StorageClass,
    Workload,
    build_workload,
    estimate,
)

LLAMA_70B: dict[str, Any] = dict(num_layers=80, num_kv_heads=8, head_size=128, dtype_bytes=2)


def test_request_counts_follow_the_commit_and_load_design() -> None:
    w = Workload(**LLAMA_70B, tp=4, prefill_tokens_per_s=6000, reuse=0.0)
    r = estimate(w)
    assert r["kv_bytes_per_token"] == 320 * 1024
    # 6000/256 chunks per second, each TP shard PUTs + 1 manifest PUT
    assert r["per_engine"]["put_per_s"] == pytest.approx(6000 / 256 * 5)  # type: ignore[index]
    assert r["per_engine"]["get_per_s"] == 0  # type: ignore[index]
    day = r["dollars_per_day"]
    assert day["put"] == pytest.approx(6000 / 256 * 5 * 86400 / 1000 * 0.005)  # type: ignore[index]


def test_hits_cost_one_manifest_get_plus_one_per_rank_and_fleet_scales() -> None:
    w = Workload(**LLAMA_70B, tp=2, prefill_tokens_per_s=1000, reuse=0.5, engines=10)
    r = estimate(w)
    hits_s = 1000 / 256  # reuse 0.5: as many tokens hit as computed
    assert r["per_engine"]["get_per_s"] == pytest.approx(hits_s * 3)  # type: ignore[index]
    assert r["fleet"]["put_per_s"] == pytest.approx(10 * 1000 / 256 * 3)  # type: ignore[index]
    assert r["per_prefix"]["partitions_assumed"] == 256  # type: ignore[index]


def test_admission_and_storage_class() -> None:
    base = estimate(Workload(**LLAMA_70B, tp=4, prefill_tokens_per_s=6000, reuse=0.3))
    cut = estimate(Workload(**LLAMA_70B, tp=4, prefill_tokens_per_s=6000, reuse=0.3,
                            admitted=0.04))
    assert cut["stored_bytes"] == pytest.approx(base["stored_bytes"] * 0.04)  # type: ignore[operator]
    with pytest.raises(ValueError, match="valid"):
        estimate(Workload(**LLAMA_70B, tp=4, prefill_tokens_per_s=1, reuse=0,
                          storage_class="glacier"))


def test_a_model_config_gives_the_shape(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 32, "num_attention_heads": 32,
                               "num_key_value_heads": 8, "hidden_size": 4096,
                               "torch_dtype": "bfloat16"}))
    w = build_workload(config=cfg, prefill_tokens_per_s=1000)
    assert (w.num_layers, w.num_kv_heads, w.head_size, w.dtype_bytes) == (32, 8, 128, 2)
    assert w.kv_bytes_per_token == 128 * 1024
    assert build_workload(config=cfg, prefill_tokens_per_s=1000, dtype="fp8").dtype_bytes == 1


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"layers": None}, "--config"),
        ({"kv_heads": 0}, "--config"),
        ({"tp": 0}, "--tp"),
        ({"engines": -1}, "--engines"),
        ({"chunk_tokens": True}, "--chunk-tokens"),
        ({"prefill_tokens_per_s": 0}, "--prefill-tokens-per-s"),
        ({"reuse": 1.0}, "--reuse"),
        ({"reuse": -0.1}, "--reuse"),
        ({"admitted": 0}, "--admitted"),
        ({"admitted": 1.5}, "--admitted"),
        ({"ttl_days": 0}, "--ttl-days"),
        ({"dtype": "int4"}, "--dtype"),
        ({"storage_class": "glacier"}, "--class"),
    ],
)
def test_bad_options_name_the_option(overrides: dict[str, Any], option: str) -> None:
    kwargs: dict[str, Any] = {"layers": 80, "kv_heads": 8, "head_size": 128,
                              "prefill_tokens_per_s": 6000, **overrides}
    with pytest.raises(InputError) as info:
        build_workload(**kwargs)
    assert info.value.option == option
    assert str(info.value).startswith(f"{option}: ")


def test_dtype_choices_match_the_byte_table() -> None:
    assert sorted(get_args(Dtype)) == sorted(DTYPE_BYTES)
    assert sorted(get_args(StorageClass)) == sorted(PRICES)


def test_replicated_heads_are_stored_once() -> None:
    """8 KV heads at TP 16: eight ranks upload, each head once; the bytes do not grow."""
    at8 = estimate(Workload(**LLAMA_70B, tp=8, prefill_tokens_per_s=6000, reuse=0.0))
    at16 = estimate(Workload(**LLAMA_70B, tp=16, prefill_tokens_per_s=6000, reuse=0.0))
    commits = 6000 / 256
    for r in (at8, at16):
        assert r["per_engine"]["put_per_s"] == pytest.approx(commits * (8 + 1))  # type: ignore[index]
    assert at16["per_engine"]["write_mib_s"] == at8["per_engine"]["write_mib_s"]  # type: ignore[index]
