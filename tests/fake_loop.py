"""The backend's side of a queue thread, played by a test: the loop's readers (the fds it
watches, served on demand holding the data-plane lock, as the loop runs its callbacks)
and the transport's answers that a test does not look at."""

from __future__ import annotations

import select
from collections.abc import Callable

from viommu._dataplane import DataplaneLock


class FakeLoop:
    """Readers (viommu.transport.sockets) of a loop that holds `lock` for its callbacks, and
    a transport that has no vring error fd (Ring.signal_error)."""

    def __init__(self) -> None:
        self.lock = DataplaneLock()
        self.readers: dict[int, Callable[[], object]] = {}

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def signal_error(self) -> bool:
        return False

    def serve_wakeups(self, timeout: float = 0) -> None:
        """What the loop does when a watched fd (a thread's wake fd) is readable."""
        fds = list(self.readers)
        ready = select.select(fds, [], [], timeout)[0] if fds else []
        if ready:
            with self.lock:
                for fd in ready:
                    if fd in self.readers:
                        self.readers[fd]()
