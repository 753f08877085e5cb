"""The command line's own pure functions: parsing, formatting, redaction, progress."""

from __future__ import annotations

import pytest

from s3kv.cli.common import format_age, format_size, parse_duration, parse_size, redact


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
