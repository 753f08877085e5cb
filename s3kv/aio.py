"""One background asyncio loop per process for all S3 I/O.

The forward path and the scheduler loop are synchronous; they hand coroutines
to this loop and get a :class:`concurrent.futures.Future` back immediately.
Nothing on those paths ever waits for a future's result.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Submitter(Protocol):
    """Where synchronous code hands coroutines: the I/O loop, or a test's
    hand-stepped loop (which decides exactly when each answer arrives)."""

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]: ...


class LoopThread:
    """A daemon thread running an event loop, started lazily."""

    def __init__(self, name: str = "s3kv-io") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                ready = threading.Event()
                loop = asyncio.new_event_loop()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name=self._name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Block the *calling* thread for a result: for start-up, tests and the CLI only."""
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)


_default: LoopThread | None = None
_default_lock = threading.Lock()


def io_loop() -> LoopThread:
    """The process-wide I/O loop."""
    global _default
    with _default_lock:
        if _default is None:
            _default = LoopThread()
            atexit.register(_default.stop)
        return _default
