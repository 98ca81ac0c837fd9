"""The requestq served by a thread of its own (ext/requestq.pxi), kept in step with the device.

The thread serves MAP and UNMAP that succeed without the GIL and hands every other request
to Python; `RequestService` gives it the device's rules and MAP domains, serves what it
hands off through `VirtioIommuDevice.handle_request`, and moves what it served into the
device's request trace and counters.

Both sides share the ring, guest memory and the MAP tables under one `DataplaneLock`. The
backend's loop holds it whenever it is not waiting for I/O (`dataplane_event_loop`), so
every loop callback may change them, and the thread works only in the loop's waits.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable

from viommu._dataplane import DataplaneLock, RequestServer, VirtQueue
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.uapi import Feature, RequestType

# Busy-poll window after the last request, in µs: a guest mapping pages back to back
# finds the thread awake and never kicks. 0 = wake on kicks only.
DEFAULT_POLL_US = 200.0


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


class RequestService:
    """One running requestq: its thread, and the device it serves."""

    def __init__(self, device: VirtioIommuDevice, lock: DataplaneLock, vq: VirtQueue,
                 kick_fd: int, serve_in_python: Callable[[], None],
                 notify: Callable[[], None],
                 add_reader: Callable[[int, Callable[[], None]], None],
                 remove_reader: Callable[[int], None], poll_us: float = DEFAULT_POLL_US
                 ) -> None:
        self.device = device
        self.server = RequestServer(lock, vq, kick_fd, poll_us)
        self._serve_in_python = serve_in_python
        self._notify = notify
        self._remove_reader = remove_reader
        self.stopped = False
        self.configure()
        self.sync_domains()
        device.on_domains_change.append(self.sync_domains)
        add_reader(self.server.wake_fd, self._on_wake)
        self.server.start()

    def configure(self) -> None:
        """The device's MAP/UNMAP rules, again after feature negotiation."""
        self.server.configure(self.device.negotiated(Feature.F_MAP_UNMAP),
                              self.device.map_rules())

    def sync_domains(self) -> None:
        self.server.set_domains(self.device.map_domains())

    def pause(self, paused: bool = True) -> None:
        self.server.pause(paused)

    def drain(self) -> None:
        """Move what the thread served into the device's trace and counters, in order."""
        records, dropped_map, dropped_unmap = self.server.drain()
        for record in records:
            self.device.record_served(*record)
        self.device.count_unrecorded(RequestType.VIRTIO_IOMMU_T_MAP, dropped_map)
        self.device.count_unrecorded(RequestType.VIRTIO_IOMMU_T_UNMAP, dropped_unmap)

    def stop(self) -> None:
        """End the thread and give back its fds; stopping again does nothing."""
        if self.stopped:
            return
        self.stopped = True
        self.server.stop()
        self._remove_reader(self.server.wake_fd)
        self.drain()
        self.server.close()
        if self.sync_domains in self.device.on_domains_change:
            self.device.on_domains_change.remove(self.sync_domains)

    def counters(self) -> dict:
        s = self.server
        return {"served_by_thread": s.fast_requests, "handed_to_python": s.handoffs,
                "kicks": s.kicks_seen, "sleeps": s.sleeps, "poll_us": s.poll_ns / 1000}

    def _on_wake(self) -> None:
        handoff, notify = self.server.take_wake()
        self.drain()  # first: the trace keeps the ring's order
        if handoff:
            try:
                self._serve_in_python()
            finally:
                self.server.resume()
        if notify:
            self._notify()
