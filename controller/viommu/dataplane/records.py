"""The eventq's records that the guest has not taken yet, held in order and written into the
buffers the driver posts: the Python path, served on the backend's loop. Its twin on a
thread of its own is ext/eventq.pxi's `EventServer`; the two take the same calls and report
what they did in the same form, so viommu.events.relay follows either the same way.

A report lists, oldest first, `(EVENT_DELIVERED, time_ns)` when the oldest record went into
a buffer and `(EVENT_SUMMARY_QUEUED, time_ns)` when the armed summary record went in behind
the others (after the first delivery that follows `arm_summary`). `time_ns` is
CLOCK_MONOTONIC once the batch is in the used ring, as the driver is notified (taken just
before the notify: a notify that wakes QEMU on this core may keep this thread from running
for a while before the write returns, and that wait is the interrupt's, not the backend's).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from viommu._dataplane import EVENT_DELIVERED, EVENT_SUMMARY_QUEUED

# Writes one record into the next posted buffer; False when the driver has posted none.
Push = Callable[[bytes], bool]


class RecordQueue:
    """Records waiting for eventq buffers; `deliver()` writes them through `push` and calls
    `notify` once a batch went out (no `push`: they wait)."""

    def __init__(self, push: Push | None = None, notify: Callable[[], None] | None = None
                 ) -> None:
        self.push = push
        self.notify = notify
        self._held: deque[bytes] = deque()
        self._summary: bytes | None = None
        self._report: list[tuple[int, int]] = []

    @property
    def held(self) -> int:
        return len(self._held)

    def post(self, record: bytes) -> None:
        self._held.append(bytes(record))

    def arm_summary(self, record: bytes) -> None:
        self._summary = bytes(record)

    def remove(self, positions: Iterable[int]) -> None:
        drop = set(positions)
        self._held = deque(r for i, r in enumerate(self._held) if i not in drop)

    def clear(self) -> None:
        self._held.clear()
        self._summary = None

    def take_report(self) -> list[tuple[int, int]]:
        report, self._report = self._report, []
        return report

    def deliver(self) -> int:
        """Write what the posted buffers take; the number delivered. Whatever `push`
        raises (a broken ring) goes to the caller, with the report kept exact."""
        if self.push is None:
            return 0
        start, delivered = len(self._report), 0
        try:
            while self._held and self.push(self._held[0]):
                self._held.popleft()
                delivered += 1
                self._report.append((EVENT_DELIVERED, 0))
                if self._summary is not None:  # a slot was just freed: room for it
                    self._held.append(self._summary)
                    self._summary = None
                    self._report.append((EVENT_SUMMARY_QUEUED, 0))
        finally:
            now = time.monotonic_ns()
            self._report[start:] = [(kind, now) for kind, _ in self._report[start:]]
            if delivered and self.notify is not None:
                self.notify()
        return delivered
