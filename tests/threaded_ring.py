"""A FakeDriver ring served by the requestq thread (viommu.dataplane.requestq), for tests
and fuzzing.

The caller plays the backend's loop: it holds the lock while it looks at or changes device
state, and serves the thread's wake-ups (hand-offs to Python, trace draining).
"""

from __future__ import annotations

import os
import select
import time

from viommu._dataplane import DataplaneLock, RingError
from viommu.dataplane.requestq import RequestService
from viommu.device.virtio_iommu import VirtioIommuDevice
from virtio_driver import FakeDriver


class ThreadServedRing:
    def __init__(self, device: VirtioIommuDevice, poll_us: float = 0,
                 mem_size: int = 4 << 20) -> None:
        self.driver = FakeDriver(queue_size=64, mem_size=mem_size)
        self.device = device
        self.lock = DataplaneLock()
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.readers: dict[int, object] = {}
        self.ring_errors: list[str] = []  # what Python raised serving a hand-off
        self.notifies = 0
        with self.lock:
            self.service = RequestService(
                device, self.lock, self.driver.vq, self.kick, self._serve_in_python,
                self._notify, self.readers.__setitem__, self.readers.pop, poll_us)

    def _serve_in_python(self) -> None:
        try:
            self.driver.vq.process_requests(self.device.handle_request)
        except RingError as exc:
            self.ring_errors.append(str(exc))

    def _notify(self) -> None:
        self.notifies += 1

    def close(self) -> None:
        with self.lock:
            self.service.stop()
        os.close(self.kick)

    def kick_now(self) -> None:
        os.eventfd_write(self.kick, 1)

    def serve_wakeups(self, timeout: float = 0) -> None:
        """What the loop does when the thread's wake fd is readable."""
        fds = list(self.readers)
        if fds and select.select(fds, [], [], timeout)[0]:
            with self.lock:
                self.service._on_wake()

    def wait_used(self, count: int, timeout: float = 5) -> None:
        """Until the used index reaches `count` (or Python found the ring broken)."""
        deadline = time.monotonic() + timeout
        while self.driver.used_idx() != count and not self.ring_errors:
            assert time.monotonic() < deadline, "the request thread did not answer"
            self.serve_wakeups(0.001)
