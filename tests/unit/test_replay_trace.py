"""Trace reading (the Mooncake format, the own format, every malformed line) and
the s3kv chunk ids a trace's blocks become.

A bad line must name its line number and field: a trace is often tens of
thousands of lines written by someone else's tooling, and "invalid trace"
alone would leave the reader searching.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from s3kv.keys import chunk_id
from s3kv.replay.chunks import build_table, chunk_table, trace_chunk_ids
from s3kv.replay.trace import (
    Trace,
    TraceError,
    TraceRequest,
    parse_lines,
    read_trace,
    upper_bound_hit_tokens,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "bench" / "data" / "mooncake" / "conversation_trace.jsonl"

MOONCAKE = [
    {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": list(range(14))},
    {"timestamp": 27, "input_length": 1024, "output_length": 3, "hash_ids": [0, 1]},
    {"timestamp": 27, "input_length": 513, "output_length": 0, "hash_ids": [0, 99]},
]


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_the_mooncake_format(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, [json.dumps(r) for r in MOONCAKE]))
    assert trace.source.endswith("trace.jsonl")
    assert [r.arrival_s for r in trace.requests] == [0.0, 0.027, 0.027]
    first = trace.requests[0]
    assert (first.input_tokens, first.output_tokens, first.block_tokens) == (6758, 500, 512)
    assert first.blocks == tuple(range(14))
    assert trace.requests[2].blocks == (0, 99)
    assert trace.input_tokens == 6758 + 1024 + 513
    assert trace.duration_s == pytest.approx(0.027)


def test_reads_the_own_format_with_comments_and_block_sizes(tmp_path: Path) -> None:
    lines = [
        "# own format: block_tokens per line",
        "",
        json.dumps({"timestamp": 1500.5, "input_length": 40, "output_length": 1,
                    "hash_ids": [7, 8, 9], "block_tokens": 16}),
        "   ",
        json.dumps({"timestamp": 200, "input_length": 512, "output_length": 2,
                    "hash_ids": [1]}),
    ]
    trace = read_trace(write(tmp_path, lines))
    # Sorted by arrival: the second request arrived first.
    assert [r.arrival_s for r in trace.requests] == [0.2, 1.5005]
    assert trace.requests[1] == TraceRequest(1.5005, 40, 1, (7, 8, 9), 16)
    assert trace.requests[0].block_tokens == 512


def test_equal_arrivals_keep_the_file_order(tmp_path: Path) -> None:
    lines = [json.dumps({"timestamp": 5, "input_length": 1, "output_length": 0,
                         "hash_ids": [i]}) for i in (3, 1, 2)]
    trace = read_trace(write(tmp_path, lines))
    assert [r.blocks for r in trace.requests] == [(3,), (1,), (2,)]


def test_limit_takes_the_first_requests(tmp_path: Path) -> None:
    path = write(tmp_path, ["# header", *(json.dumps(r) for r in MOONCAKE)])
    assert [r.input_tokens for r in read_trace(path, limit=2).requests] == [6758, 1024]
    assert read_trace(path, limit=0).requests == ()
    with pytest.raises(ValueError, match="limit"):
        read_trace(path, limit=-1)


def test_an_empty_file_is_an_empty_trace(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, ["# nothing"]))
    assert trace.requests == ()
    assert (trace.input_tokens, trace.duration_s) == (0, 0.0)


def test_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "absent.jsonl")


GOOD: dict[str, Any] = {"timestamp": 10, "input_length": 600, "output_length": 4,
                        "hash_ids": [1, 2]}


def with_(**changes: Any) -> str:
    doc = {**GOOD, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not DROP})


DROP = object()


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ('{"timestamp": 10, "input_length": 600,', "json", "not valid JSON"),
        ("[1, 2, 3]", "json", "JSON object"),
        (with_(timestamp=DROP), "timestamp", "missing"),
        (with_(input_length=DROP), "input_length", "missing"),
        (with_(output_length=DROP), "output_length", "missing"),
        (with_(hash_ids=DROP), "hash_ids", "missing"),
        (with_(timestamp=-1), "timestamp", ">= 0"),
        (with_(timestamp="soon"), "timestamp", "finite number"),
        (with_(timestamp=True), "timestamp", "finite number"),
        ('{"timestamp": NaN, "input_length": 600, "output_length": 4, "hash_ids": [1, 2]}',
         "timestamp", "finite number"),
        (with_(input_length=-600), "input_length", ">= 1"),
        (with_(input_length=0, hash_ids=[]), "input_length", ">= 1"),
        (with_(input_length=600.0), "input_length", "whole number"),
        (with_(output_length=-1), "output_length", ">= 0"),
        (with_(hash_ids=[1, 2, 3]), "hash_ids", "3 ids for input_length 600"),
        (with_(hash_ids=[1]), "hash_ids", "expected 2"),
        (with_(hash_ids=[1, 2], block_tokens=16), "hash_ids", "expected 38"),
        (with_(hash_ids=[1, "2"]), "hash_ids[1]", "integer"),
        (with_(hash_ids=[1.5, 2]), "hash_ids[0]", "integer"),
        (with_(hash_ids=[1, -2]), "hash_ids[1]", "integer in 0.."),
        (with_(hash_ids=[1, 2**32]), "hash_ids[1]", "integer in 0.."),
        (with_(hash_ids=[True, 2]), "hash_ids[0]", "integer"),
        (with_(hash_ids="12"), "hash_ids", "list of integers"),
        (with_(block_tokens=0), "block_tokens", ">= 1"),
        (with_(block_tokens="512"), "block_tokens", "whole number"),
    ],
)
def test_each_malformed_line_names_its_line_and_field(
    tmp_path: Path, line: str, field: str, words: str
) -> None:
    path = write(tmp_path, ["# comment", json.dumps(GOOD), "", line, json.dumps(GOOD)])
    with pytest.raises(TraceError) as err:
        read_trace(path)
    assert (err.value.line, err.value.field) == (4, field)
    assert words in err.value.problem
    assert str(err.value).startswith(f"line 4: {field}: ")
    assert isinstance(err.value, ValueError)


def test_requests_built_in_code_are_checked_too() -> None:
    with pytest.raises(ValueError, match="hash_ids: 1 ids"):
        TraceRequest(0.0, 600, 0, (1,))
    with pytest.raises(ValueError, match="input_length"):
        TraceRequest(0.0, -1, 0, ())


def req(arrival: float, tokens: int, blocks: list[int], bt: int = 512) -> TraceRequest:
    return TraceRequest(arrival, tokens, 1, tuple(blocks), bt)


def test_upper_bound_by_hand() -> None:
    trace = Trace((
        req(0, 1536, [1, 2, 3]),  # nothing seen: 0
        req(1, 1300, [1, 2, 4]),  # 1, 2 seen: 1024
        req(2, 1000, [1, 2]),  # both seen, capped at the input: 1000
        req(3, 600, [9, 2]),  # 9 unseen: the run stops at once: 0
        req(4, 700, [1, 4]),  # 1 seen, 4 seen (request 2 had it): capped at 700
        req(5, 40, [1, 2, 3], bt=16),  # another block size: ids never match: 0
        req(6, 32, [1, 2], bt=16),  # seen at 16-token blocks: 32
    ), "hand")
    assert upper_bound_hit_tokens(trace) == 1024 + 1000 + 700 + 32


def test_upper_bound_of_the_shipped_mooncake_trace() -> None:
    if not SHIPPED.exists():
        pytest.skip(f"the Mooncake trace is not in the repository yet ({SHIPPED})")
    trace = read_trace(SHIPPED)
    assert len(trace.requests) == 12_031
    assert trace.duration_s == pytest.approx(3_536.999)
    assert trace.input_tokens == 144_793_823
    assert upper_bound_hit_tokens(trace) / trace.input_tokens == pytest.approx(0.374, abs=5e-4)


def test_parse_lines_numbers_from_one() -> None:
    with pytest.raises(TraceError) as err:
        parse_lines(["oops"], "inline")
    assert err.value.line == 1


# --- what a trace's blocks become: s3kv chunk ids ------------------------------------


def test_chunk_ids_follow_the_documented_stand_in() -> None:
    r = req(0, 2100, [10, 11, 12, 13, 14])
    # 256-token chunks inside 512-token blocks: (block of the last token, tokens reached).
    c0 = chunk_id(None, [10, 256], None)
    c1 = chunk_id(c0, [10, 512], None)
    c2 = chunk_id(c1, [11, 256], None)
    assert trace_chunk_ids(r, 256)[:3] == [c0, c1, c2]
    assert len(trace_chunk_ids(r, 256)) == 2100 // 256
    # 1024-token chunks span two blocks: the second one names both.
    d0 = chunk_id(None, [11, 512], None)
    assert trace_chunk_ids(r, 1024) == [d0, chunk_id(d0, [13, 512], None)]
    # 48-token chunks over 512-token blocks: chunk 10 ends at token 528, in block 1.
    ids = trace_chunk_ids(r, 48)
    assert ids[10] == chunk_id(ids[9], [11, 16], None)
    # Another block size enters the id, so its hash ids never collide with 512's.
    small = req(0, 32, [10, 11], bt=16)
    assert trace_chunk_ids(small, 16)[0] == chunk_id(None, [10, 16], {"block_tokens": 16})


def test_a_chunk_ending_inside_a_block_is_shared_only_with_the_whole_block() -> None:
    a, b = req(0, 1024, [1, 2]), req(0, 1024, [1, 3])
    assert trace_chunk_ids(a, 256)[:2] == trace_chunk_ids(b, 256)[:2]
    assert trace_chunk_ids(a, 256)[2] != trace_chunk_ids(b, 256)[2]
    # Same first block, other second block: the 768-token chunk ends in block 1 and differs.
    assert trace_chunk_ids(a, 768) != trace_chunk_ids(b, 768)


def test_table_numbers_each_distinct_chunk_once() -> None:
    trace = Trace((req(0, 1024, [1, 2]), req(1, 1536, [1, 2, 3]), req(2, 600, [1, 9])), "t")
    table = build_table(trace, 512)
    assert len(table) == 3  # [1], [1,2], [1,2,3]; request 3's second block is partial
    assert table.requests == [(0, 1), (0, 1, 2), (0,)]
    assert table.parent == [-1, 0, 1] and table.index == [0, 1, 2]
    assert table.ids == trace_chunk_ids(trace.requests[1], 512)
    assert table.partition == [int(c[:2], 16) for c in table.ids]
    assert chunk_table(trace, 512) is chunk_table(trace, 512)
