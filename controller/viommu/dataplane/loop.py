"""The backend's event loop, sharing the data plane with the queue threads (ext/).

The request thread (viommu.dataplane.requestq) touches the rings, guest memory and the MAP
tables only while it holds the `DataplaneLock`. The loop holds that lock whenever it is not
waiting in select, so every loop callback may change them, and the thread works only in the
loop's waits.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable

from viommu._dataplane import DataplaneLock


class LockReleasingSelector(selectors.EpollSelector):
    """The loop's selector: the loop holds `lock` except while it waits in select."""

    def __init__(self, lock: DataplaneLock) -> None:
        super().__init__()
        self._lock = lock

    def select(self, timeout: float | None = None) -> list:
        self._lock.release()
        try:
            return super().select(timeout)
        finally:
            self._lock.acquire()

    def close(self) -> None:
        super().close()
        self._lock.release()


def dataplane_event_loop(lock: DataplaneLock) -> asyncio.AbstractEventLoop:
    """A new event loop for the calling thread, holding `lock` outside its waits."""
    lock.acquire()
    return asyncio.SelectorEventLoop(LockReleasingSelector(lock))


class _NoTimer:
    def cancel(self) -> None:
        pass


class DeferredLoop:
    """The backend's loop, given once it runs (`bind`): what components hold instead of the
    loop itself, since they are built before it exists. Timers asked for before then never
    fire (nothing runs them: a backend driven by tests without a loop)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def call_later(self, delay: float,
                   callback: Callable[[], object]) -> _NoTimer | asyncio.TimerHandle:
        if self.loop is None:
            return _NoTimer()
        return self.loop.call_later(delay, callback)

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self.loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> bool:
        return self.loop.remove_reader(fd)
