"""A fault-injecting HTTP reverse proxy in front of a real S3 endpoint.

Tests point a store at :attr:`FaultProxy.url` and add rules; every request
is forwarded to the upstream endpoint (moto) byte for byte, with its
original ``Host`` header so SigV4 signatures still match, unless a rule
fires for it. A rule matches on the HTTP method and a regex searched in the
percent-decoded path (``/bucket/key``; also in ``/bucket/key?query`` when
there is a query, so ``/k$`` matches presigned requests too), and may fire only
on the Nth match, at most ``times`` times, or with a probability drawn from
its own seeded RNG. Every rule counts the requests it matches; the first
rule that fires decides the request's fate::

    proxy.add("PUT", r"/r0$", SlowDown(), times=2)   # two 503s, then pass
    proxy.add("GET", r"manifest\\.json$", Drop(), nth=1)
    proxy.add(None, r"", Blackhole())                 # nothing ever answers

A :class:`Trigger` arms rules at a moment in the traffic rather than a count
of their own matches: ``down = proxy.trigger("GET", r"/abc.*manifest")`` then
``proxy.add(None, "", Drop(), when=down)`` fails everything from the first
manifest GET of chunk ``abc...`` on (that request included). A trigger made
with ``answered=True`` counts only requests the server answered with a 2xx
that the proxy passes on unharmed, and fires before the client sees that
answer: "once the 4th manifest PUT is acknowledged" rather than "once it
arrives" (a refused, dropped or damaged request never counts; a delayed or
held one counts once it is answered).

Actions: :class:`Delay`, :class:`Drop`, :class:`Error` (:func:`SlowDown`,
:func:`InternalError`), :class:`Truncate`, :class:`FlipBytes`,
:class:`Blackhole`, :class:`Hold`. The proxy counts requests (:attr:`FaultProxy.requests`)
and injected faults (:attr:`Rule.injected`, :attr:`FaultProxy.faults`).

Request bodies may arrive with ``Content-Length`` or chunked; they are
forwarded whole with a ``Content-Length``. ``Expect: 100-continue`` is
answered by the proxy (the header is never signed).
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

# Headers that describe one hop, never forwarded as they are.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "expect", "content-length",
})


# --- actions ------------------------------------------------------------------


@dataclass(frozen=True)
class Delay:
    """Hold the request ``ms`` milliseconds, then forward it normally."""

    ms: float
    kind = "delay"


@dataclass(frozen=True)
class Drop:
    """Close the connection without any response.

    ``after_upstream``: forward first (the server applies the request) and
    lose only the response. ``reset``: abortive close (RST) instead of FIN.
    """

    after_upstream: bool = False
    reset: bool = False
    kind = "drop"


@dataclass(frozen=True)
class Error:
    """Answer with an S3 XML error instead of forwarding."""

    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    kind = "error"


def SlowDown() -> Error:
    return Error(503, "SlowDown", "Please reduce your request rate.")


def InternalError() -> Error:
    return Error(500, "InternalError", "We encountered an internal error. Please try again.")


@dataclass(frozen=True)
class Truncate:
    """Forward, then send only ``keep`` body bytes (default: half) under the
    full ``Content-Length``, and close the connection."""

    keep: int | None = None
    kind = "truncate"


@dataclass(frozen=True)
class FlipBytes:
    """Forward, then invert the response body bytes at ``offsets`` (negative
    offsets count from the end; default: the middle byte)."""

    offsets: tuple[int, ...] | None = None
    kind = "flip"


@dataclass(frozen=True)
class Blackhole:
    """Accept the request and never answer until the proxy stops."""

    kind = "blackhole"


@dataclass(frozen=True, eq=False)
class Hold:
    """Hold the request until ``gate`` is set (or the proxy stops), then
    forward it: a server that accepted work and answers only later."""

    gate: threading.Event
    kind = "hold"


Action = Delay | Drop | Error | Truncate | FlipBytes | Blackhole | Hold


# --- rules and records --------------------------------------------------------


@dataclass
class Trigger:
    """Fires for good on the ``nth`` request matching ``method`` and ``path``;
    :attr:`event` is set then (``Hold(trigger.event)`` waits for it). With
    ``answered`` it counts a request only once the server answered it with a
    2xx that is passed on unharmed."""

    method: str | None = None
    path: str = ""
    nth: int = 1
    answered: bool = False
    matched: int = 0
    event: threading.Event = field(default_factory=threading.Event, repr=False)
    _regex: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._regex = re.compile(self.path)
        if self.method is not None:
            self.method = self.method.upper()

    @property
    def fired(self) -> bool:
        return self.matched >= self.nth

    def _see(self, method: str, target: str) -> None:
        if self.method is not None and method != self.method:
            return
        path = target.split("?", 1)[0]
        if self._regex.search(path) or (path != target and self._regex.search(target)):
            self.matched += 1
            if self.matched >= self.nth:
                self.event.set()


@dataclass
class Rule:
    action: Action
    method: str | None = None
    path: str = ""
    nth: int | None = None
    times: int | None = None
    probability: float | None = None
    seed: int = 0
    when: Trigger | None = None
    matched: int = 0
    injected: int = 0
    _regex: re.Pattern[str] = field(init=False, repr=False)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._regex = re.compile(self.path)
        self._rng = random.Random(self.seed)
        if self.method is not None:
            self.method = self.method.upper()

    def _matches(self, method: str, target: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        path = target.split("?", 1)[0]
        return bool(self._regex.search(path) or (path != target and self._regex.search(target)))

    def _fires(self, method: str, target: str, *, taken: bool) -> bool:
        """Called under the proxy lock for every request and every rule: each
        rule counts its matches; ``taken`` says an earlier rule already fired."""
        if self.when is not None and not self.when.fired:
            return False
        if not self._matches(method, target):
            return False
        self.matched += 1
        if taken:
            return False
        if self.nth is not None and self.matched != self.nth:
            return False
        if self.times is not None and self.injected >= self.times:
            return False
        if self.probability is not None and self._rng.random() >= self.probability:
            return False
        self.injected += 1
        return True


@dataclass
class Record:
    """One request, recorded when it arrives; ``status`` is filled in once
    answered (None while held or when no status line was sent)."""

    method: str
    target: str
    host: str | None
    body_bytes: int
    fault: str | None
    status: int | None = None


# --- the server ---------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # clients open many connections at once
    proxy: FaultProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET

    # --- one request --------------------------------------------------------

    def _read_body(self) -> bytes | None:
        """The request body, de-chunked; None when the client went away."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts: list[bytes] = []
            while True:
                line = self.rfile.readline(1 << 16)
                if not line:
                    return None
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, up to the blank line
                        trailer = self.rfile.readline(1 << 16)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    return b"".join(parts)
                chunk = self.rfile.read(size)
                if len(chunk) != size:
                    return None
                parts.append(chunk)
                self.rfile.readline(1 << 16)  # the CRLF after the chunk
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        return body if len(body) == n else None

    def _proxy(self) -> None:
        proxy = self.server.proxy
        method, target = self.command, self.path
        host = self.headers.get("Host")
        body = self._read_body()
        if body is None:
            self.close_connection = True
            return
        rule = proxy._match(method, unquote(target))
        action = rule.action if rule is not None else None
        record = Record(method, target, host, len(body), action.kind if action else None)
        proxy._record(record)
        try:
            if isinstance(action, Blackhole):
                proxy._released.wait()
                self.close_connection = True
            elif isinstance(action, Drop) and not action.after_upstream:
                self._abort(action.reset)
            elif isinstance(action, Error):
                record.status = action.status
                self._send_error_xml(action, target)
            else:
                if isinstance(action, Delay):
                    proxy._released.wait(action.ms / 1000)
                elif isinstance(action, Hold):
                    while not (action.gate.wait(0.05) or proxy._released.is_set()):
                        pass
                try:
                    up_status, reason, headers, data = self._forward(method, target, body)
                except OSError as exc:
                    record.status = 502
                    self._send(502, "Bad Gateway", [("Content-Type", "text/plain")],
                               f"upstream failed: {exc}".encode())
                    return
                if isinstance(action, Drop):
                    self._abort(action.reset)
                elif isinstance(action, Truncate):
                    record.status = up_status
                    keep = len(data) // 2 if action.keep is None else action.keep
                    keep = max(0, min(keep, len(data) - 1))
                    self._send(up_status, reason, headers, data[:keep],
                               content_length=len(data), head=method == "HEAD")
                    self.close_connection = True
                elif isinstance(action, FlipBytes):
                    record.status = up_status
                    self._send(up_status, reason, headers, _flip(data, action.offsets),
                               head=method == "HEAD")
                else:
                    record.status = up_status
                    if 200 <= up_status < 300:  # before the client can see the answer
                        proxy._answered(method, unquote(target))
                    self._send(up_status, reason, headers, data, head=method == "HEAD")
        except OSError:  # the client went away first
            self.close_connection = True

    def _forward(
        self, method: str, target: str, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        up = self.server.proxy.upstream
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=60)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():  # Host included, verbatim
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or method in ("PUT", "POST") or "Content-Length" in self.headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _send(
        self, status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes,
        *, content_length: int | None = None, head: bool = False,
    ) -> None:
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        upstream_length = None
        for name, value in headers:
            if name.lower() == "content-length":
                upstream_length = value
            if name.lower() not in HOP_BY_HOP:
                lines.append(f"{name}: {value}\r\n")
        if head:  # no body follows; the length is the object's
            if upstream_length is not None:
                lines.append(f"Content-Length: {upstream_length}\r\n")
            body = b""
        elif status not in (204, 304) and not 100 <= status < 200:
            n = len(body) if content_length is None else content_length
            lines.append(f"Content-Length: {n}\r\n")
        lines.append("\r\n")
        self.wfile.write("".join(lines).encode("latin-1") + body)
        self.wfile.flush()

    def _send_error_xml(self, err: Error, target: str) -> None:
        resource = escape(urlsplit(target).path)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(err.code)}</Code><Message>{escape(err.message)}</Message>"
            f"<Resource>{resource}</Resource><RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", "fault-proxy")]
        if err.status == 503:
            headers.append(("Retry-After", "0"))
        self._send(err.status, http.client.responses.get(err.status, "Error"), headers, body,
                   head=self.command == "HEAD")

    def _abort(self, reset: bool) -> None:
        self.close_connection = True
        if reset:  # SO_LINGER 0: close() sends RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))


def _flip(data: bytes, offsets: tuple[int, ...] | None) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for off in offsets if offsets is not None else (len(data) // 2,):
        out[off] ^= 0xFF
    return bytes(out)


class FaultProxy:
    """The proxy; :meth:`start` binds 127.0.0.1 on a free port."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream = urlsplit(upstream_url)
        if self.upstream.scheme != "http" or self.upstream.hostname is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self.rules: list[Rule] = []
        self.triggers: list[Trigger] = []
        self.requests: list[Record] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._released = threading.Event()
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> FaultProxy:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name="fault-proxy", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release blackholed and delayed requests, close every connection."""
        if self._released.is_set():
            return
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy not started")
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    # --- rules --------------------------------------------------------------

    def add(
        self, method: str | None, path: str, action: Action, *, nth: int | None = None,
        times: int | None = None, probability: float | None = None, seed: int = 0,
        when: Trigger | None = None, first: bool = False,
    ) -> Rule:
        """Add a rule (checked after the ones already there, or before them
        with ``first``) and return it; with ``when`` it takes part only once
        that trigger has fired."""
        rule = Rule(action, method, path, nth, times, probability, seed, when)
        with self._lock:
            self.rules.insert(0 if first else len(self.rules), rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            self.rules.remove(rule)

    def trigger(self, method: str | None, path: str, *, nth: int = 1,
                answered: bool = False) -> Trigger:
        trig = Trigger(method, path, nth, answered)
        with self._lock:
            self.triggers.append(trig)
        return trig

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.triggers.clear()

    # --- counting -----------------------------------------------------------

    def count(self, method: str | None = None, path: str = "") -> int:
        """Requests seen (faulted or not) with this method whose target matches ``path``."""
        probe = Rule(Delay(0), method, path)
        with self._lock:
            return sum(1 for r in self.requests if probe._matches(r.method, unquote(r.target)))

    def wait_for_requests(self, n: int, method: str | None = None, path: str = "",
                          timeout: float = 10.0) -> bool:
        """Block until at least ``n`` matching requests have arrived (held ones
        included); False if ``timeout`` passes first."""
        probe = Rule(Delay(0), method, path)

        def seen() -> bool:
            return sum(1 for r in self.requests
                       if probe._matches(r.method, unquote(r.target))) >= n

        with self._changed:
            return self._changed.wait_for(seen, timeout)

    @property
    def faults(self) -> int:
        """Faults injected since the start, by every rule (cleared ones included)."""
        with self._lock:
            return sum(1 for r in self.requests if r.fault is not None)

    # --- handler side -------------------------------------------------------

    def _match(self, method: str, target: str) -> Rule | None:
        chosen = None
        with self._lock:
            for trig in self.triggers:
                if not trig.answered:
                    trig._see(method, target)
            for rule in self.rules:
                if rule._fires(method, target, taken=chosen is not None):
                    chosen = rule
        return chosen

    def _answered(self, method: str, target: str) -> None:
        with self._lock:
            for trig in self.triggers:
                if trig.answered:
                    trig._see(method, target)

    def _record(self, record: Record) -> None:
        with self._changed:
            self.requests.append(record)
            self._changed.notify_all()

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)


__all__ = [
    "Action",
    "Blackhole",
    "Delay",
    "Drop",
    "Error",
    "FaultProxy",
    "FlipBytes",
    "Hold",
    "InternalError",
    "Record",
    "Rule",
    "SlowDown",
    "Trigger",
    "Truncate",
]
