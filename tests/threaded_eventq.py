"""A device's eventq over a FakeDriver ring: an EventRelay and its EventQueue, served by the
event thread (ext/eventq.pxi) or on the loop (viommu.dataplane.records.RecordQueue), for
tests and fuzzing.

The caller plays the backend's loop: it holds the lock while it looks at or changes device
state, and serves the thread's wake-ups. The harness plays the transport (the ring, its kick
and call eventfds) and the device's health.
"""

from __future__ import annotations

import os
import time

from fake_loop import FakeLoop

from viommu._dataplane import VirtQueue
from viommu.dataplane.eventq import EventQueue
from viommu.events.relay import EventRelay
from viommu.events.smmuv3 import EventId, EventRecord
from virtio_driver import FakeDriver

SETTLE_TIMEOUT = 5.0
# Buffers posted without a kick are found within this (the product waits up to 64 ms).
LOOK_MAX_MS = 2


class EventqGuest(FakeLoop):
    """The guest side of an eventq and the device's side of it, in one object."""

    def __init__(self, threaded: bool, capacity: int = 8, queue_size: int = 16,
                 mem_size: int = 1 << 20) -> None:
        super().__init__()
        self.driver = FakeDriver(queue_size=queue_size, mem_size=mem_size)
        self.vq: VirtQueue = self.driver.vq
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.broken: str | None = None
        self.buffers: dict[int, list[tuple[int, int]]] = {}  # head -> its writable parts
        self.received: list[tuple[int, bytes]] = []  # (used length, bytes) in used order
        self.relay = EventRelay(capacity=capacity)
        with self.lock:
            self.eventq = EventQueue(self.relay, self)
            if threaded:
                self.eventq.use_thread(self.lock, self, look_max_ms=LOOK_MAX_MS)
            self.eventq.started(self)

    # --- the transport's side (Ring; the loop's Readers are FakeLoop's) --------------------

    def notify(self) -> None:
        os.eventfd_write(self.call_fd, 1)

    # --- the device's health (DeviceHealth) ----------------------------------------------------

    def ring_broken(self, why: str, ring) -> None:
        self.broken = why
        self.eventq.pause()

    # --- the driver ------------------------------------------------------------------------------

    def room(self) -> int:
        """Buffers the driver can still post (the ring holds `size` outstanding)."""
        return self.driver.size - ((self.driver._avail_idx - self.driver.used_idx()) & 0xFFFF)

    def post_buffers(self, count: int, size: int = 24, kick: bool = True) -> None:
        """Post `count` device-writable buffers of `size` bytes, as Linux's
        viommu_fill_evtq does (one descriptor each)."""
        for _ in range(count):
            self.post_chain([(size, True)], kick=False)
        if kick:
            self.kick()

    def post_readable_buffer(self, kick: bool = True) -> None:
        """A buffer the device cannot write into (a malformed eventq buffer)."""
        self.post_chain([(24, False)], kick)

    def post_chain(self, parts: list[tuple[int, bool]], kick: bool = True,
                   outside_ram: bool = False) -> None:
        """One buffer of several descriptors, (length, device-writable) each; outside
        guest RAM if asked. Nothing when the ring is full of outstanding buffers."""
        if self.room():
            segments = [(0x10 if outside_ram else self.driver.alloc(length), length, writable)
                        for length, writable in parts]
            head = self.driver.add_chain(segments)
            self.driver.publish(head)
            self.buffers[head] = [(gpa, n) for gpa, n, writable in segments if writable]
        if kick:
            self.kick()

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def take_received(self) -> list[tuple[int, bytes]]:
        """What the device put in the used ring since the last call: (length, bytes)."""
        out = []
        for head, length in self.driver.take_used():
            data = b"".join(self.driver.read(gpa, n) for gpa, n in self.buffers[head]
                            ) if length else b""
            out.append((length, data[:length]))
        self.received += out
        return out

    def notified(self) -> bool:
        """Whether the device signalled the call eventfd since the last call."""
        try:
            return os.eventfd_read(self.call_fd) > 0
        except BlockingIOError:
            return False

    # --- the loop ------------------------------------------------------------------------------

    def look(self) -> None:
        """On the Python path: what the loop does on a kick (the kick read, the ring
        served). Called after every step whether or not the driver kicked, so that the
        Python path has delivered what it can, as the thread does on its own."""
        with self.lock:
            if not self.eventq.threaded:
                try:
                    os.eventfd_read(self.kick_fd)
                except BlockingIOError:
                    pass
                self.eventq.kicked()

    def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Until the device has delivered all it can: no record waits, or no buffer is
        posted, or the device is broken."""
        self.look()
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                server = self.eventq.server
                held = self.relay.pending + self.relay.counters()["summaries_pending"]
                if (self.broken or not held or not self.vq.avail_pending()
                        or server is None):
                    return
            assert time.monotonic() < deadline, "the event thread did not deliver"
            self.serve_wakeups(0.0002)

    def replay(self, op: tuple) -> None:
        """One step of a scenario, then `settle`: ("inject", count, sid, ssid or None,
        event ID, address), ("post", buffers, size, kick), ("chain", ((length, writable),
        ...), outside RAM, kick), ("break",) the avail index 100 ahead, ("drain", sid,
        pasid), ("reset",), ("extended", on), ("restart",) the ring, ("call",) a new call
        fd, ("nothing",)."""
        kind = op[0]
        if kind == "inject":
            _, count, sid, ssid, event_id, address = op
            self.inject(count, sid=sid, ssid=ssid, event_id=event_id, address=address)
        elif kind == "post":
            self.post_buffers(op[1], size=op[2], kick=op[3])
        elif kind == "chain":
            self.post_chain(list(op[1]), kick=op[3], outside_ram=op[2])
        elif kind == "break":
            self.driver.set_avail_idx((self.driver._avail_idx + 100) & 0xFFFF)
            self.kick()
        elif kind != "nothing":
            with self.lock:
                self._backend_step(op)
        self.settle()

    def _backend_step(self, op: tuple) -> None:
        kind = op[0]
        if kind == "drain":
            self.relay.drain(op[1], op[2], "PASID unbound")
        elif kind == "reset":
            self.relay.drop_pending("device reset")
        elif kind == "extended":
            self.relay.extended = op[1]
        elif kind == "restart":
            self.eventq.stopped()
            self.eventq.started(self)
        elif kind == "call":
            old, self.call_fd = self.call_fd, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.eventq.call_changed()
            os.close(old)
        else:
            raise ValueError(f"no such step: {op}")

    def inject(self, count: int = 1, sid: int = 0x100, ssid: int | None = None,
               event_id: EventId = EventId.F_TRANSLATION, address: int = 0x1000) -> None:
        record = EventRecord(event_id=event_id, sid=sid, ssid=ssid or 0, ssv=ssid is not None,
                             address=address, rnw=True)
        with self.lock:
            self.relay.submit_burst(record, count)

    def counters(self) -> dict:
        with self.lock:
            return self.relay.counters()

    def close(self) -> None:
        with self.lock:
            self.eventq.stopped()
            if self.eventq.server is not None:
                self.eventq.server.close()
        os.close(self.kick_fd)
        os.close(self.call_fd)
