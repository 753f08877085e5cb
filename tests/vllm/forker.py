"""A process that imports vLLM once and forks one engine process per job.

Importing vLLM and torch costs about 15 s of CPU on a 2-core machine, more
than a tiny model's whole job, and the end-to-end tests start dozens of
engines. Each test still gets an engine process of its own (its own pid,
environment, working directory and stderr; TP workers spawned by vLLM exactly
as in production); only the import is shared, as a copy-on-write fork of this
process taken before any engine state exists. This process never runs torch
code, so it holds no thread pools a fork could break.

Protocol, one unix-socket connection per engine: the client sends one JSON
line ``{"job", "result", "stderr", "cwd", "env"}``, and the forker answers
``{"pid": N}`` once the engine process exists and ``{"rc": code}`` when it ends
(as :attr:`subprocess.Popen.returncode`: negative for the signal that killed it).
The forker exits, killing its engines, when its stdin closes.

    python -m tests.vllm.forker NAME     # abstract socket "\\0NAME"; prints "ready" when it serves
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import tempfile
import time
import traceback
from typing import Any


def preload() -> None:
    """Import what every engine job imports, so no fork pays for it again."""
    import vllm  # noqa: F401
    from vllm import LLM, SamplingParams  # noqa: F401
    from vllm.inputs import TokensPrompt  # noqa: F401

    import devtools.engine_run  # noqa: F401
    import s3kv.vllm.connector  # noqa: F401


def read_message(sock: socket.socket, timeout: float | None) -> dict[str, Any]:
    """One JSON line from ``sock``; TimeoutError if none within ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
        part = sock.recv(65536)  # raises TimeoutError at the deadline
        if not part:
            raise ConnectionError("the other end closed the connection mid-message")
        buf += part
    msg: dict[str, Any] = json.loads(buf)
    return msg


def _send(conn: socket.socket, msg: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(msg).encode() + b"\n")


def _engine(req: dict[str, Any]) -> None:
    """In the forked child: become the engine process the request describes."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        tempfile.tempdir = None  # TMPDIR is the job's, not the forker's
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(err, 2)
        os.close(err)
        os.close(null)
        from devtools import engine_run

        code = engine_run.main([req["job"], req["result"]])  # exits itself on success
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process it started.

    Not by process group: a TP>1 CPU engine in a session of its own is a
    scheduling group of its own, whose spinning workers starved its I/O
    threads on a 2-core machine (see docs/faults.md).
    """
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def socket_address(name: str) -> str:
    """An abstract unix socket: no file to clean up, no path-length limit."""
    return "\0" + name


def serve(name: str) -> None:
    preload()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_address(name))
    listener.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    stdin = sys.stdin.fileno()
    sel.register(stdin, selectors.EVENT_READ)
    waiting: dict[int, socket.socket] = {}
    print("ready", flush=True)
    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    try:
                        req = read_message(conn, 30)
                    except (OSError, ValueError):
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        listener.close()
                        for c in (conn, *waiting.values()):
                            c.close()
                        _engine(req)
                    waiting[pid] = conn
                    _send(conn, {"pid": pid})
                elif key.fd == stdin:
                    if not os.read(stdin, 65536):
                        return  # the test session is gone
                else:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 4096):
                            pass
                    _reap(waiting)
    finally:
        for pid in waiting:
            kill_tree(pid)


def _reap(waiting: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            _send(conn, {"rc": os.waitstatus_to_exitcode(status)})
            conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
