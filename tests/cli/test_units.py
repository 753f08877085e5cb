"""Pure functions: parsing, formatting, redaction, chain rebuild, eviction order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from s3kv.catalog import bounded_map
from s3kv.cli.common import format_age, format_size, parse_duration, parse_size, redact
from s3kv.gc import Policies, evict_oldest_leaves, select_chain_deletions
from s3kv.inventory import ChunkRecord, build_prefixes, subtree_newest


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("90m", 5400), ("12h", 43200), ("7d", 604800), ("2w", 1209600),
    ("1h30m", 5400), ("0s", 0), ("1.5h", 5400), (" 7D ", 604800),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "7x", "h", "-1h", "1h 30m", "7days", "1e3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="30s, 90m, 12h, 7d"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("500GiB", 500 * 1024**3), ("10MB", 10_000_000), ("10mb", 10_000_000), ("1KiB", 1024),
    ("1kB", 1000), ("1.5TiB", int(1.5 * 1024**4)), ("1024", 1024), ("2B", 2), ("3 GB", 3 * 10**9),
    ("1PiB", 1024**5),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "10G", "10M", "GiB", "-5GiB", "10 gigabytes", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="500GiB, 10MB"):
        parse_size(text)


def test_formatting() -> None:
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(500 * 1024**3) == "500 GiB"
    assert format_age(None) == "-"
    assert format_age(59) == "59s"
    assert format_age(3600 * 5 + 1) == "5h"
    assert format_age(86400 * 3) == "3d"


def test_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    msg = ("<Error><Code>InvalidAccessKeyId</Code><AWSAccessKeyId>AKIAABCDEFGHIJKLMNOP"
           "</AWSAccessKeyId></Error> key=very-secret-value Credential=AKIAX/2026/us-east-1")
    out = redact(msg)
    assert "AKIAABCDEFGHIJKLMNOP" not in out
    assert "very-secret-value" not in out
    assert "AKIAX/" not in out
    assert "InvalidAccessKeyId" in out


def rec(cid: str, parent: str | None, index: int, modified: float, size: int = 10,
        ns: str = "n" * 32) -> ChunkRecord:
    return ChunkRecord(ns, cid, parent, index, 4, size, 2, modified)


def test_build_prefixes_tree_and_hole() -> None:
    # a -> b -> c ; a -> b -> d ; x (parent missing) -> y
    records = [
        rec("a", None, 0, 1.0), rec("b", "a", 1, 2.0), rec("c", "b", 2, 3.0),
        rec("d", "b", 2, 5.0), rec("y", "x", 3, 4.0),
    ]
    got = {p.leaf: p for p in build_prefixes(records)}
    assert set(got) == {"c", "d", "y"}
    assert (got["c"].chunks, got["c"].tokens, got["c"].bytes) == (3, 12, 30)
    assert got["c"].complete and got["d"].complete
    assert (got["d"].oldest, got["d"].newest) == (1.0, 5.0)
    assert got["y"].chunks == 1 and not got["y"].complete


def test_subtree_newest() -> None:
    records = [rec("a", None, 0, 1.0), rec("b", "a", 1, 2.0), rec("c", "b", 2, 9.0),
               rec("d", "a", 1, 3.0)]
    newest = subtree_newest(records)
    assert newest == {"a": 9.0, "b": 9.0, "c": 9.0, "d": 3.0}


def test_bounded_map_limits_concurrency() -> None:
    running = peak = 0

    async def source() -> AsyncIterator[int]:
        for i in range(50):
            yield i

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1
        return i * 2

    async def main() -> list[int]:
        return [x async for x in bounded_map(source(), work, 4)]

    out = asyncio.run(main())
    assert sorted(out) == [i * 2 for i in range(50)]
    assert peak <= 4


def test_eviction_takes_leaves_first() -> None:
    """Oldest first, but never a chunk that something live still extends."""
    ns = "n" * 32
    # root r (oldest) <- m <- leaf l (newest); a lone old chunk o.
    records = {ns: [rec("r", None, 0, 1.0, 100), rec("m", "r", 1, 2.0, 100),
                    rec("l", "m", 2, 9.0, 100), rec("o", None, 0, 5.0, 100)]}
    doomed: list[str] = []
    evict_oldest_leaves(records, {}, lambda r, reason: doomed.append(r.chunk_id), 150, 400)
    # Leaves are o (t=5) and l (t=9): o goes first, then l, then m; r stays.
    assert doomed == ["o", "l", "m"]
    chosen = select_chain_deletions(records, Policies(max_bytes=150), now=10.0)
    assert [cid for _, cid in chosen] == ["o", "l", "m"]
    assert {p.reason for p in chosen.values()} == {"max-size"}


def test_progress_draws_only_when_enabled(capsys: pytest.CaptureFixture[str]) -> None:
    from s3kv.cli.common import Progress

    quiet = Progress("x")  # captured stderr is not a terminal
    quiet.update(1, 2)
    quiet.close()
    assert capsys.readouterr().err == ""
    bar = Progress("deleting", enabled=True)
    bar.update(1, 2)
    bar.update(2, 2)
    bar.close()
    err = capsys.readouterr().err
    assert "\rdeleting [" in err and err.endswith("2/2\n")
