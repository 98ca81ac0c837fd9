"""A FakeDriver ring served by the requestq thread (viommu.dataplane.requestq), for tests
and fuzzing.

The caller plays the backend's loop: it holds the lock while it looks at or changes device
state, and serves the thread's wake-ups (hand-offs to Python, trace draining).
"""

from __future__ import annotations

import os
import time

from fake_loop import FakeLoop

from viommu._dataplane import VirtQueue
from viommu.dataplane.requestq import RequestQueue, RequestThreadOptions
from viommu.device.virtio_iommu import VirtioIommuDevice
from virtio_driver import FakeDriver


class ThreadServedRing(FakeLoop):
    """Plays the transport (the ring, its kick fd, its notify) and the device's health
    (ring errors are kept) for a RequestQueue with a thread."""

    def __init__(self, device: VirtioIommuDevice, poll_us: float = 0,
                 mem_size: int = 4 << 20, adaptive: bool = True,
                 null_device: bool = False) -> None:
        super().__init__()
        self.driver = FakeDriver(queue_size=64, mem_size=mem_size)
        self.device = device
        self.vq: VirtQueue = self.driver.vq
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ring_errors: list[str] = []  # what Python raised serving a hand-off
        self.notifies = 0
        self.broken: str | None = None
        with self.lock:
            self.service = RequestQueue(device, self, self, (self.lock, self),
                                        RequestThreadOptions(poll_us, adaptive, null_device))

    # --- the transport's side (Ring; the loop's Readers are FakeLoop's) --------------------

    def notify(self) -> None:
        self.notifies += 1

    # --- the device's health (DeviceHealth): a broken ring is recorded, not served ---------

    def ring_broken(self, why: str, ring) -> None:
        self.ring_errors.append(why)

    def close(self) -> None:
        with self.lock:
            self.service.stop()
        os.close(self.kick_fd)

    def kick_now(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def wait_used(self, count: int, timeout: float = 5) -> None:
        """Until the used index reaches `count` (or Python found the ring broken)."""
        deadline = time.monotonic() + timeout
        while self.driver.used_idx() != count and not self.ring_errors:
            assert time.monotonic() < deadline, "the request thread did not answer"
            self.serve_wakeups(0.001)
