"""The requestq, served by a thread of its own (ext/requestq.pxi) or on the loop.

The thread serves MAP and UNMAP that succeed without the GIL and hands every other request
to Python: `RequestQueue` gives it the device's rules and MAP domains, serves what it hands
off through `VirtioIommuDevice.handle_request`, and moves what it served into the device's
request log. Without a thread (no data-plane loop, or `--no-request-thread`) every request
is served on the loop when the driver kicks. The thread's busy-poll window adapts to what
polling earns (ext/poll_policy.pxi); `null_device` is a benchmark's floor, where the thread
answers every request S_OK and does nothing else.

Both sides share the ring, guest memory and the MAP tables under one `DataplaneLock` that
the loop holds outside its waits (viommu.dataplane.loop).
"""

from __future__ import annotations

import dataclasses

from viommu._dataplane import DataplaneLock, RequestServer, RingError
from viommu.dataplane.rings import DeviceHealth, Ring
from viommu.device.observers import DeviceObserver
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.transport.sockets import Readers
from viommu.uapi import Feature, RequestType

# Busy-poll window after the last request, in µs: a guest mapping pages back to back
# finds the thread awake and never kicks. 0 = wake on kicks only.
DEFAULT_POLL_US = 200.0


@dataclasses.dataclass(frozen=True)
class RequestThreadOptions:
    poll_us: float = DEFAULT_POLL_US  # the busy-poll window's cap (0: kicks only)
    adaptive_poll: bool = True  # the window follows what polling earns; else always poll_us
    null_device: bool = False  # benchmark floor: every request S_OK, nothing done


class RequestQueue(DeviceObserver):
    """One running requestq and the device it serves."""

    def __init__(self, device: VirtioIommuDevice, ring: Ring, health: DeviceHealth,
                 thread: tuple[DataplaneLock, Readers] | None = None,
                 options: RequestThreadOptions | None = None) -> None:
        """`thread`: serve on a thread, sharing the ring under this lock with the loop
        whose readers hear the thread's wake-ups; None: serve on `kicked()`."""
        self.device = device
        self.ring = ring
        self.health = health
        self.server: RequestServer | None = None
        self.stopped = False
        if thread is not None:
            lock, self._readers = thread
            options = options or RequestThreadOptions()
            self.server = RequestServer(lock, ring.vq, ring.kick_fd, options.poll_us,
                                        adaptive=options.adaptive_poll,
                                        null_device=options.null_device)
            self.configure()
            self.map_domains_changed()
            device.observe(self)
            self._readers.add_reader(self.server.wake_fd, self._on_wake)
            self.server.start()
            self.server.pause(bool(health.broken))

    @property
    def threaded(self) -> bool:
        return self.server is not None

    def configure(self) -> None:
        """The device's MAP/UNMAP rules, again after feature negotiation."""
        if self.server is None:
            return
        self.server.configure(self.device.negotiated(Feature.F_MAP_UNMAP),
                              self.device.map_rules())

    def map_domains_changed(self) -> None:
        if self.server is not None:
            self.server.set_domains(self.device.map_domains())

    def pause(self, paused: bool = True) -> None:
        if self.server is not None:
            self.server.pause(paused)

    def kicked(self) -> None:
        """The driver kicked and nobody else waits for its kicks: serve the ring here."""
        self.serve()

    def serve(self) -> None:
        """Serve what the ring holds, in Python, in ring order."""
        if self.health.broken:
            return
        try:
            used = self.ring.vq.process_requests(self.device.handle_request)
        except RingError as exc:
            self.health.ring_broken(str(exc), self.ring)
            return
        if used and self.ring.vq.needs_interrupt():
            self.ring.notify()

    def drain(self) -> None:
        """Move what the thread served into the device's request log, in order."""
        if self.server is None:
            return
        records, dropped_map, dropped_unmap = self.server.drain()
        log = self.device.requests
        for record in records:
            log.record_served(*record)
        log.count_unrecorded(RequestType.VIRTIO_IOMMU_T_MAP, dropped_map)
        log.count_unrecorded(RequestType.VIRTIO_IOMMU_T_UNMAP, dropped_unmap)

    def stop(self) -> None:
        """End the thread and give back its fds; stopping again does nothing."""
        if self.stopped:
            return
        self.stopped = True
        if self.server is None:
            return
        self.server.stop()
        self._readers.remove_reader(self.server.wake_fd)
        self.drain()
        self.server.close()
        self.device.unobserve(self)

    def counters(self) -> dict | None:
        """The thread's counters; None when the ring is served on the loop."""
        s = self.server
        if s is None:
            return None
        return {"served_by_thread": s.fast_requests, "handed_to_python": s.handoffs,
                "kicks": s.kicks_seen, "sleeps": s.sleeps, "null_device": s.null_device,
                **s.poll_counters()}

    def _on_wake(self) -> None:
        handoff, notify = self.server.take_wake()
        self.drain()  # first: the trace keeps the ring's order
        if handoff:
            try:
                self.serve()
            finally:
                self.server.resume()
        if notify:
            self.ring.notify()
