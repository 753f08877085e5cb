"""``s3kv capacity`` through the command line: options in, figures out.

The figures are the README's worked example (Llama-3.1-70B, bf16, TP=4,
6,000 prefill tokens/s, 30% reuse), so a change to the model shows up here
as a changed number, not only in the unit tests of :mod:`s3kv.capacity`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from s3kv.cli.app import app

LLAMA_70B = {"num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
             "hidden_size": 8192, "torch_dtype": "bfloat16"}
WORKLOAD = ("--tp", "4", "--prefill-tokens-per-s", "6000", "--reuse", "0.3")


def capacity(*args: str) -> Result:
    return CliRunner().invoke(app, ["capacity", *args])


@pytest.fixture
def llama_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    return path


def test_prints_the_readme_example_for_a_fleet(llama_config: Path) -> None:
    res = capacity("--config", str(llama_config), *WORKLOAD, "--engines", "100")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "KV 320 KiB/token, shard 20.0 MiB (256 tokens / TP 4)"
    assert "per engine: PUT 117.2/s  GET 50.2/s  write 1875 MiB/s" in lines[1]
    assert "fleet of 100: PUT 11718.8/s  GET 5022.3/s" in lines[2]
    assert "per prefix: PUT 45.8/s of 3500" in lines[3]
    assert "(needs >= 4)" in lines[3]
    assert "stored: 15449.5 TiB at 1.0 day TTL" in lines[4]
    assert "total 18259.39 (PUT 5062.50, GET 173.57, storage 13023.31" in lines[5]
    assert res.stderr == ""


def test_shape_options_give_the_same_figures_as_the_config(llama_config: Path) -> None:
    from_config = capacity("--config", str(llama_config), *WORKLOAD)
    from_shape = capacity("--layers", "80", "--kv-heads", "8", "--head-size", "128", *WORKLOAD)
    assert from_config.exit_code == from_shape.exit_code == 0
    assert from_config.stdout == from_shape.stdout


def test_json_carries_the_version_and_raw_figures(llama_config: Path) -> None:
    res = capacity("--config", str(llama_config), *WORKLOAD, "--admitted", "0.04",
                   "--class", "express", "--dtype", "fp8", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["version"] == 1
    assert doc["kv_bytes_per_token"] == 160 * 1024  # fp8 halves bf16's 320 KiB
    assert doc["workload"]["storage_class"] == "express"
    assert doc["workload"]["admitted"] == 0.04
    assert doc["per_engine"]["put_per_s"] == pytest.approx(6000 / 256 * 0.04 * 5)
    assert doc["per_prefix"]["partitions_assumed"] == 1


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--layers", "80", "--kv-heads", "8"), "--config"),  # shape incomplete
        (("--config", "{cfg}.missing"), "--config"),
        (("--config", "{cfg}", "--reuse", "1"), "--reuse"),
        (("--config", "{cfg}", "--tp", "0"), "--tp"),
        (("--config", "{cfg}", "--admitted", "0"), "--admitted"),
        (("--config", "{cfg}", "--dtype", "int4"), "--dtype"),
        (("--config", "{cfg}", "--class", "glacier"), "--class"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_option(
    llama_config: Path, args: tuple[str, ...], option: str
) -> None:
    argv = [a.format(cfg=llama_config) for a in args]
    res = capacity(*argv, "--prefill-tokens-per-s", "6000")
    assert res.exit_code == 2
    assert f"'{option}'" in res.stderr
    assert res.stdout == ""


def test_a_config_without_the_shape_names_the_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"num_hidden_layers": 2}))
    res = capacity("--config", str(path), "--prefill-tokens-per-s", "1")
    assert res.exit_code == 2
    assert "'num_attention_heads'" in res.stderr and "'--config'" in res.stderr


def test_prefill_rate_is_required() -> None:
    res = capacity("--layers", "2", "--kv-heads", "2", "--head-size", "4")
    assert res.exit_code == 2
    assert "--prefill-tokens-per-s" in res.stderr
