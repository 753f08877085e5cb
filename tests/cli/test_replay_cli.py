"""``s3kv replay`` through the command line: options in, report out.

The traces are a few hand-made requests written to a temporary file, so
every figure can be checked by hand or against :func:`s3kv.replay.sim.replay`
called directly: the command must add nothing to the simulation but option
parsing and rendering.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from s3kv.cli.app import app
from s3kv.replay.chunks import distinct_chunk_bytes
from s3kv.replay.plots import retentions_for
from s3kv.replay.sim import ROUTINGS, FleetConfig, replay
from s3kv.replay.trace import Trace, TraceRequest, read_trace

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "bench" / "data" / "mooncake" / "conversation_trace.jsonl"

# Four requests, 1 s apart: two share a 1,024-token prompt, a third extends it
# by one block, the fourth is unrelated. Upper bound: 0 + 1024 + 1024 + 0.
REQUESTS = [
    {"timestamp": 0, "input_length": 1024, "output_length": 8, "hash_ids": [1, 2]},
    {"timestamp": 1000, "input_length": 1024, "output_length": 8, "hash_ids": [1, 2]},
    {"timestamp": 2000, "input_length": 1536, "output_length": 8, "hash_ids": [1, 2, 3]},
    {"timestamp": 3000, "input_length": 512, "output_length": 8, "hash_ids": [4]},
]
INPUT_TOKENS = 1024 + 1024 + 1536 + 512
UPPER_BOUND = 2048

OPTIONS = ("--engines", "--routing", "--local-cache", "--model", "--config",
           "--kv-bytes-per-token", "--kv-heads", "--tp", "--prefill-tokens-per-s",
           "--chunk-tokens", "--no-s3", "--class", "--admission", "--admission-window",
           "--ttl", "--max-size", "--gc-interval", "--gpu-dollars-per-hour", "--seed",
           "--limit", "--json", "--plot")


def run(*args: str) -> Result:
    return CliRunner().invoke(app, ["replay", *args])


def report(*args: str) -> dict[str, Any]:
    res = run(*args, "--json")
    assert res.exit_code == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return path


def test_help_lists_every_option() -> None:
    res = run("--help")
    assert res.exit_code == 0
    missing = [o for o in OPTIONS if o not in res.stdout]
    assert missing == []
    assert "TRACE" in res.stdout


def test_json_matches_the_simulation_called_directly(trace: Path) -> None:
    # Slow prefill (2,000 tokens/s), so loading a chunk from S3 beats recomputing it.
    doc = report(str(trace), "--local-cache", "0", "--prefill-tokens-per-s", "2000")
    assert doc["version"] == 1
    assert doc["requests"] == 4
    assert doc["input_tokens"] == INPUT_TOKENS
    assert doc["upper_bound_tokens"] == UPPER_BOUND
    # No local cache: every reused token comes from S3. The repeated prompt hits
    # 3 of its 4 chunks (vLLM computes the last prompt token, so the chunk holding
    # it is computed), the extension all 4 of the first prompt's: 7 x 256.
    assert doc["local_hit_tokens"] == 0
    assert doc["s3_hit_tokens"] == 7 * 256
    assert doc["computed_tokens"] == INPUT_TOKENS - 7 * 256
    # 8 distinct chunks committed, each 4 shards + 1 manifest; 7 hit chunks,
    # each a manifest GET and 4 shard GETs; three lookups end on a 404.
    assert doc["s3_requests"] == {"put": 8 * 5, "get": 7 * 5, "get_miss": 3, "delete": 0}
    assert doc["prefill_seconds_saved"] == pytest.approx(7 * 256 / 2000)

    direct = replay(read_trace(trace), FleetConfig(local_cache_bytes=0,
                                                   prefill_tokens_per_s=2000))
    assert doc["s3_hit_tokens"] == direct.s3_hit_tokens
    assert doc["s3_requests"] == direct.s3_requests
    assert doc["dollars_per_day"] == pytest.approx(direct.dollars_per_day)
    assert doc["ttft_p99_s"] == pytest.approx(direct.ttft_p99_s)
    assert doc["tokens_saved_per_s3_dollar"] == pytest.approx(direct.tokens_saved_per_s3_dollar)


def test_one_engine_with_an_unbounded_cache_never_needs_s3(trace: Path) -> None:
    doc = report(str(trace))  # defaults: 1 engine, unbounded local cache, S3 on
    assert doc["local_hit_tokens"] == 7 * 256
    assert doc["s3_hit_tokens"] == 0


def test_without_s3_or_local_cache_everything_is_computed(trace: Path) -> None:
    doc = report(str(trace), "--no-s3", "--local-cache", "0")
    assert doc["local_hit_tokens"] == doc["s3_hit_tokens"] == 0
    assert doc["computed_tokens"] == INPUT_TOKENS
    assert doc["prefill_seconds_saved"] == 0
    assert doc["dollars_per_day"]["total"] == 0
    assert doc["s3_requests"] == {"put": 0, "get": 0, "get_miss": 0, "delete": 0}


def test_options_reach_the_fleet_config(trace: Path) -> None:
    args = ("--engines", "3", "--routing", "round-robin", "--local-cache", "1MiB",
            "--kv-bytes-per-token", "1024", "--kv-heads", "2", "--tp", "2",
            "--prefill-tokens-per-s", "5000", "--chunk-tokens", "128", "--class", "express",
            "--admission", "second_sighting", "--admission-window", "1000", "--ttl", "30m",
            "--max-size", "1GB", "--gc-interval", "1m", "--gpu-dollars-per-hour", "3.5",
            "--seed", "7")
    direct = replay(read_trace(trace), FleetConfig(
        engines=3, routing="round-robin", local_cache_bytes=2**20, kv_bytes_per_token=1024,
        num_kv_heads=2, tp=2, prefill_tokens_per_s=5000, chunk_tokens=128,
        storage_class="express", admission="second_sighting", admission_window=1000,
        ttl_s=1800, max_bytes=10**9, gc_interval_s=60, gpu_dollars_per_hour=3.5, seed=7))
    doc = report(str(trace), *args)
    expected = json.loads(json.dumps(direct.to_json()))
    for key in ("config", "local_hit_tokens", "s3_hit_tokens", "s3_requests",
                "gpu_dollars_per_day_saved"):
        assert doc[key] == expected[key], key


def test_a_cache_percentage_is_of_the_trace_distinct_bytes(trace: Path) -> None:
    distinct = distinct_chunk_bytes(read_trace(trace), 256, 1000)
    assert distinct > 0
    doc = report(str(trace), "--local-cache", "50%", "--kv-bytes-per-token", "1000")
    assert doc["config"]["local_cache_bytes"] == distinct // 2


def test_model_preset_sets_the_kv_size(trace: Path) -> None:
    doc = report(str(trace), "--model", "llama-3-8b")
    assert doc["config"]["kv_bytes_per_token"] == 131_072


def test_text_report_has_the_figures(trace: Path) -> None:
    res = run(str(trace), "--local-cache", "0", "--prefill-tokens-per-s", "2000")
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    for phrase in ("4 requests", "S3 hits", "computed (misses)", "upper bound", "TTFT",
                   "without S3", "busiest partition", "S3 $ per day", "GPU $ per day saved",
                   "per S3 dollar", "events/s", "get_miss"):
        assert phrase in out, phrase
    assert f"{UPPER_BOUND:,}" in out
    s3_row = next(line.split() for line in out.splitlines() if line.startswith("  S3 hits"))
    assert s3_row == ["S3", "hits", "1,792", "43.8%", "87.5%"]
    assert res.stderr == ""  # no bar: stderr is not a terminal


def test_limit_replays_the_first_requests(trace: Path) -> None:
    assert report(str(trace), "--limit", "2")["requests"] == 2


def test_a_malformed_line_names_the_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in REQUESTS[:2]]
    lines.append(json.dumps({"timestamp": 2000, "input_length": "many", "output_length": 1,
                             "hash_ids": [1]}))
    path.write_text("\n".join(lines) + "\n")
    res = run(str(path))
    assert res.exit_code == 2
    assert f"{path} line 3: input_length:" in res.stderr
    assert res.stdout == ""


def test_a_missing_trace_is_a_usage_error(tmp_path: Path) -> None:
    res = run(str(tmp_path / "nope.jsonl"))
    assert res.exit_code == 2
    assert "nope.jsonl" in res.stderr


def test_unknown_routing_names_the_option_and_the_choices(trace: Path) -> None:
    res = run(str(trace), "--routing", "sticky")
    assert res.exit_code == 2
    assert "'--routing'" in res.stderr
    assert all(choice in res.stderr for choice in ROUTINGS)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--max-size", "-1GiB"), "--max-size"),
        (("--max-size", "lots"), "--max-size"),
        (("--local-cache", "-5%"), "--local-cache"),
        (("--local-cache", "80G"), "--local-cache"),
        (("--ttl", "10"), "--ttl"),
        (("--gc-interval", "-1m"), "--gc-interval"),
        (("--engines", "0"), "--engines"),
        (("--tp", "0"), "--tp"),
        (("--class", "glacier"), "--class"),
        (("--admission", "some"), "--admission"),
        (("--model", "llama-9"), "--model"),
        (("--model", "llama-3-8b", "--kv-bytes-per-token", "10"), "--kv-bytes-per-token"),
        (("--prefill-tokens-per-s", "0"), "--prefill-tokens-per-s"),
        (("--gpu-dollars-per-hour", "-1"), "--gpu-dollars-per-hour"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_option(
    trace: Path, args: tuple[str, ...], option: str
) -> None:
    res = run(str(trace), *args)
    assert res.exit_code == 2, res.stdout
    assert f"'{option}'" in res.stderr
    assert res.stdout == ""


def test_an_unknown_model_lists_the_presets(trace: Path) -> None:
    res = run(str(trace), "--model", "llama-9")
    assert "llama-3-70b" in res.stderr


def test_plot_writes_two_pngs(trace: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the 'replay' extra)")
    out = tmp_path / "plots"
    res = run(str(trace), "--plot", str(out))
    assert res.exit_code == 0, res.stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["hit_rate_vs_cache.png", "s3_cost_vs_retention.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 1000
        assert f"plot: {png}" in res.stdout


def test_the_shipped_trace_replays(tmp_path: Path) -> None:
    doc = report(str(SHIPPED), "--limit", "500", "--engines", "4",
                 "--routing", "prefix-affinity", "--local-cache", "1%")
    assert doc["requests"] == 500
    assert 0 < doc["local_hit_tokens"] + doc["s3_hit_tokens"] <= doc["upper_bound_tokens"]
    assert doc["upper_bound_tokens"] < doc["input_tokens"]


def test_plot_without_matplotlib_says_how_to_install_it(
    trace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    res = run(str(trace), "--plot", str(tmp_path / "plots"))
    assert res.exit_code == 2
    assert "'--plot'" in res.stderr and "pip install 's3kv[replay]'" in res.stderr
    assert not (tmp_path / "plots").exists()


def test_retention_sweep_stays_inside_the_trace_span() -> None:
    def spanning(seconds: float) -> Trace:
        reqs = tuple(TraceRequest(t, 512, 1, (i,)) for i, t in enumerate((0.0, seconds)))
        return Trace(reqs, "t")

    assert retentions_for(spanning(3)) == [None]
    assert retentions_for(spanning(3537)) == [60, 300, 600, 1800, None]
    assert retentions_for(spanning(7 * 86400)) == [1800, 3600, 6 * 3600, 24 * 3600, None]
