"""Shared plumbing for every command: options, parsing, output, exit codes.

Conventions every command keeps, so the CLI composes in scripts: data goes to
stdout (a table, or one JSON document), logs, prompts and progress to stderr;
exit codes say what kind of failure it was; nothing ever prints credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar, get_args

import typer

from s3kv.catalog import (
    AmbiguousNamespace,
    Catalog,
    InvalidNamespace,
    NamespaceNotFound,
    is_directory_bucket,
)
from s3kv.config import Backend, Settings, StoreSettings, parse_settings
from s3kv.errors import (
    AccessDenied,
    ConfigError,
    NoSuchBucket,
    S3KVError,
    StoreError,
    Unavailable,
)
from s3kv.keys import KeyLayout
from s3kv.store import MultipartAdmin, ObjectStore, open_store

T = TypeVar("T")

JSON_VERSION = 1


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    INTERRUPTED = 130


class CliError(Exception):
    """A failure worded for the user, with the exit code it maps to."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.code = code


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


# --- durations and sizes --------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
DURATION_FORMS = "a number with a unit s, m, h, d or w, e.g. 30s, 90m, 12h, 7d, 1h30m"

_SIZE_UNITS = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "pb": 1000**5,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5,
}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)$")
SIZE_FORMS = (
    "bytes or a number with a unit: IEC KiB, MiB, GiB, TiB, PiB (powers of 1024) "
    "or SI kB, MB, GB, TB, PB (powers of 1000), e.g. 500GiB, 10MB"
)


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ValueError naming the valid forms."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ValueError(f"{text!r} is not a duration; use {DURATION_FORMS}")
    return total


def parse_size(text: str) -> int:
    """Bytes in ``text``; raises ValueError naming the valid forms."""
    m = _SIZE_RE.match(text.strip().lower())
    if m is None or (m.group(2) not in _SIZE_UNITS and m.group(2) != ""):
        raise ValueError(f"{text!r} is not a size; use {SIZE_FORMS}")
    value = float(m.group(1)) * _SIZE_UNITS.get(m.group(2), 1)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large")
    return int(value)


def duration_option(text: str | float) -> float:
    if isinstance(text, (int, float)):  # a default, already in seconds
        return float(text)
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def size_option(text: str | int) -> int:
    if isinstance(text, int):  # a default, already in bytes
        return text
    try:
        return parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def format_size(n: int) -> str:
    """IEC units, three significant figures: what a table reader compares at a glance."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n} B"  # pragma: no cover - loop always returns


def format_age(seconds: float | None) -> str:
    """A compact age in the same units the duration options accept."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"


def iso(ts: float | None) -> str | None:
    """Timestamps in JSON: ISO 8601, UTC, whole seconds."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- output ---------------------------------------------------------------------


def echo(text: str = "") -> None:
    """Data: stdout."""
    typer.echo(text)


def note(text: str) -> None:
    """Everything that is not data: stderr."""
    typer.echo(text, err=True)


def emit_json(doc: dict[str, Any]) -> None:
    echo(json.dumps({"version": JSON_VERSION, **doc}, indent=2, sort_keys=False))


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Sequence[int] = ()) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(widths[i]) if i in right else c.ljust(widths[i])
               for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


_SECRET_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{12,}\b"), "[redacted]"),
    (re.compile(r"<(AWSAccessKeyId|SignatureProvided|StringToSign|StringToSignBytes|"
                r"CanonicalRequest|CanonicalRequestBytes)>.*?</\1>", re.S),
     r"<\1>[redacted]</\1>"),
    (re.compile(r"(Credential=)[^,\s]+"), r"\1[redacted]"),
    (re.compile(r"(Signature=)[0-9a-f]+"), r"\1[redacted]"),
]


def redact(text: str) -> str:
    """Strip anything credential-shaped from a message before it is shown.

    Server error bodies echo the access key id and signing material back,
    and client libraries put them into exception text.
    """
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "[redacted]")
    for pat, repl in _SECRET_PATTERNS:
        text = pat.sub(repl, text)
    return text


def one_line(text: str, limit: int = 300) -> str:
    """Error text as one redacted line: client libraries embed whole XML bodies."""
    flat = " ".join(redact(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal.

    Piped or captured stderr gets nothing, so logs stay free of carriage
    returns.
    """

    def __init__(self, label: str, *, enabled: bool | None = None) -> None:
        self._label = label
        self._enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        frac = done / total if total else 1.0
        bar = "#" * int(frac * width)
        sys.stderr.write(f"\r{self._label} [{bar:<{width}}] {done}/{total}")
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        if self._enabled and self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def confirm(question: str) -> bool:
    """Ask on stderr, read stdin, default No; end of input means No."""
    sys.stderr.write(f"{question} [y/N]: ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


# --- connection options ---------------------------------------------------------

BucketOpt = Annotated[
    str | None,
    typer.Option("--bucket", envvar="S3KV_BUCKET", help="S3 bucket holding the cache.",
                 show_default=False),
]
PrefixOpt = Annotated[
    str | None,
    typer.Option("--prefix", envvar="S3KV_PREFIX",
                 help=f"Key prefix inside the bucket [default: {StoreSettings.prefix}].",
                 show_default=False),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option("--endpoint-url", envvar="S3KV_ENDPOINT_URL",
                 help="S3 endpoint (omit for AWS; otherwise http(s)://host[:port]).",
                 show_default=False),
]
RegionOpt = Annotated[
    str | None,
    typer.Option("--region", envvar="S3KV_REGION",
                 help="Region (default: from the AWS configuration).", show_default=False),
]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", envvar="S3KV_BACKEND",
                 help=f"Client library: {' or '.join(get_args(Backend))} "
                      f"[default: {StoreSettings.backend}].", show_default=False),
]
FormatOpt = Annotated[
    OutputFormat,
    typer.Option("--format", "-f", help="Output format.", case_sensitive=False),
]


@dataclass(frozen=True)
class Conn:
    """Resolved connection settings; parsing them is where bad config surfaces."""

    settings: Settings

    @property
    def bucket(self) -> str:
        return self.settings.store.bucket

    @property
    def prefix(self) -> str:
        return self.settings.store.prefix

    @property
    def layout(self) -> KeyLayout:
        return KeyLayout(self.settings.store.prefix)

    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/"


def connection(
    bucket: str | None,
    prefix: str | None,
    endpoint_url: str | None,
    region: str | None,
    backend: str | None,
) -> Conn:
    """Funnel flags and environment through the connector's own parser."""
    raw: dict[str, Any] = {"bucket": bucket}
    for key, value in (("prefix", prefix), ("endpoint_url", endpoint_url),
                       ("region", region), ("backend", backend)):
        if value is not None and value != "":
            raw[key] = value
    return Conn(parse_settings(raw))


@contextlib.asynccontextmanager
async def opened(conn: Conn) -> AsyncIterator[ObjectStore]:
    store = await open_store(conn.settings.store)
    try:
        yield store
    finally:
        with contextlib.suppress(Exception):
            await store.close()


@contextlib.asynccontextmanager
async def multipart_admin(conn: Conn, store: ObjectStore) -> AsyncIterator[MultipartAdmin]:
    """A store that can list and abort multipart uploads: ``store`` itself if
    its backend can (aioboto3), otherwise an aioboto3 store opened for that
    part alone (obstore has no multipart listing), closed on exit."""
    if isinstance(store, MultipartAdmin):
        yield store
        return
    side = await open_store(dataclasses.replace(conn.settings.store, backend="aioboto3"))
    try:
        if not isinstance(side, MultipartAdmin):  # pragma: no cover - aioboto3 always is
            raise CliError("no backend can list multipart uploads")
        yield side
    finally:
        with contextlib.suppress(Exception):
            await side.close()


def make_catalog(conn: Conn, store: ObjectStore) -> Catalog:
    return Catalog(store, conn.layout, concurrency=conn.settings.store.max_concurrency,
                   ordered_listing=not is_directory_bucket(conn.bucket))


# --- running and errors -----------------------------------------------------------


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def describe(exc: BaseException, conn: Conn | None) -> tuple[str, ExitCode]:
    """Message and exit code for an error, worded for the person at the terminal."""
    where = conn.where() if conn is not None else "the bucket"
    if isinstance(exc, CliError):
        return str(exc), exc.code
    if isinstance(exc, ConfigError):
        return f"configuration: {exc}", ExitCode.CONFIG
    if isinstance(exc, NoSuchBucket):
        bucket = conn.bucket if conn is not None else "?"
        return f"bucket {bucket!r} does not exist (NoSuchBucket)", ExitCode.CONFIG
    if isinstance(exc, AccessDenied):
        return (f"access denied on {where}: {one_line(str(exc))} -- check the credentials the "
                f"AWS chain resolves (environment, ~/.aws files, SSO, instance role) and the "
                f"IAM policy", ExitCode.CONFIG)
    if isinstance(exc, (InvalidNamespace, AmbiguousNamespace)):
        return str(exc), ExitCode.USAGE
    if isinstance(exc, NamespaceNotFound):
        return f"{exc}; `s3kv ls` lists the namespaces", ExitCode.FAILURE
    if isinstance(exc, Unavailable):
        return f"endpoint unreachable: {one_line(str(exc))}", ExitCode.FAILURE
    if isinstance(exc, StoreError):
        return f"store error: {one_line(str(exc))}", ExitCode.FAILURE
    if isinstance(exc, S3KVError):
        return one_line(str(exc)), ExitCode.FAILURE
    return f"{type(exc).__name__}: {one_line(str(exc))}", ExitCode.FAILURE


@dataclass
class Scope:
    """What an error message may refer to; filled in as the command learns it."""

    command: str
    conn: Conn | None = None


@contextlib.contextmanager
def cli_errors(command: str) -> Iterator[Scope]:
    """Turn every expected failure into one stderr line and an exit code."""
    scope = Scope(command)
    try:
        yield scope
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        note(f"s3kv {command}: interrupted")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except Exception as exc:
        message, code = describe(exc, scope.conn)
        note(f"s3kv {command}: {message}")
        raise typer.Exit(code) from None


def sort_rows(rows: list[T], key: Callable[[T], Any], *, reverse: bool,
              limit: int | None) -> list[T]:
    rows = sorted(rows, key=key, reverse=reverse)
    return rows[:limit] if limit is not None else rows
