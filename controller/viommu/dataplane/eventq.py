"""The eventq: fault records into the buffers the driver posted (virtio spec 5.13.6.9).

`EventQueue` is the relay's sink (viommu.events.relay): it holds the records the guest has
not taken, in order, and delivers them. With a thread (`use_thread`) they live in
ext/eventq.pxi's `EventServer`, which writes them into posted buffers and signals the call
eventfd itself, looking at the ring when a record is posted, on every kick and, while
records wait, at backed-off intervals (Linux posts its first eventq buffers without a
kick). Without one (no data-plane loop, or `--no-event-thread`) they live in a
`RecordQueue` served on the loop, when a record arrives and when the driver kicks.

Both report what they delivered the same way; the relay replays that report, so its
counters and trace states are exact whichever serves the ring.
"""

from __future__ import annotations

from viommu._dataplane import DataplaneLock, EventServer, RingError
from viommu.dataplane.records import RecordQueue
from viommu.dataplane.rings import DeviceHealth, Ring
from viommu.events.relay import EventRelay
from viommu.transport.sockets import Readers


class EventQueue:
    """The guest's eventq, whether or not its ring runs; the relay's sink."""

    def __init__(self, relay: EventRelay, health: DeviceHealth) -> None:
        self.relay = relay
        self.health = health
        self.ring: Ring | None = None
        self.server: EventServer | None = None
        self._readers: Readers | None = None
        self._queue: RecordQueue | EventServer = RecordQueue(self._push, self._notify)
        relay.attach_sink(self)

    def use_thread(self, lock: DataplaneLock, readers: Readers, **server_args) -> None:
        """Serve the ring on a thread of its own from its next start, sharing it under
        `lock` with the loop whose `readers` hear the thread's wake-ups. What waits moves
        into the thread's queue. `server_args` go to EventServer (`look_max_ms`)."""
        self.relay.sync()
        self.server = EventServer(lock, self.relay.capacity, **server_args)
        self._queue = self.server
        self._readers = readers
        self.relay.attach_sink(self)

    @property
    def threaded(self) -> bool:
        return self.server is not None

    # --- the ring's life ---------------------------------------------------------------------

    def started(self, ring: Ring) -> bool:
        """The ring runs; True when the thread waits for its kicks (`kicked` is not called)."""
        self.ring = ring
        if self.server is not None:
            self._readers.add_reader(self.server.wake_fd, self._on_wake)
            self.server.start(ring.vq, ring.kick_fd, _fd(ring.call_fd))
            self.server.pause(bool(self.health.broken))
        self.relay.deliver()  # records that waited for the ring
        return self.server is not None

    def stopped(self) -> None:
        if self.server is not None and self.ring is not None:
            self.server.stop()
            self._readers.remove_reader(self.server.wake_fd)
            self.relay.sync()
        self.ring = None

    def call_changed(self) -> None:
        """The front-end gave the running ring another call fd."""
        if self.server is not None and self.ring is not None:
            self.server.set_call_fd(_fd(self.ring.call_fd))

    def kicked(self) -> None:
        """The driver posted buffers (served on the loop): what waits goes out."""
        self.relay.deliver()

    def pause(self, paused: bool = True) -> None:
        """The device is broken (or reset again): stop delivering (or go on)."""
        if self.server is not None:
            self.server.pause(paused)

    def counters(self) -> dict | None:
        """The thread's counters; None when the ring is served on the loop."""
        s = self.server
        if s is None:
            return None
        return {"delivered_by_thread": s.delivered, "notifies": s.notifies,
                "kicks": s.kicks_seen, "ring_looks": s.looks, "wakes": s.wakes}

    # --- the relay's sink ------------------------------------------------------------------------

    def post(self, record: bytes) -> None:
        self._queue.post(record)

    def arm_summary(self, record: bytes) -> None:
        self._queue.arm_summary(record)

    def remove(self, positions: list[int]) -> None:
        self._queue.remove(positions)

    def clear(self) -> None:
        self._queue.clear()

    def take_report(self) -> list[tuple[int, int]]:
        return self._queue.take_report()

    def deliver(self) -> None:
        if self.ring is None or self.health.broken:
            return
        if self.server is not None:
            if not self.server.serve():
                self._ring_failed()
            return
        try:
            self._queue.deliver()
        except RingError as exc:
            self.health.ring_broken(str(exc), self.ring)

    # --- the Python path's ring, and the thread's wake-ups ----------------------------------

    def _push(self, record: bytes) -> bool:
        return self.ring.vq.push_event(record)

    def _notify(self) -> None:
        if self.ring.vq.needs_interrupt():
            self.ring.notify()

    def _on_wake(self) -> None:
        failed = self.server.take_wake()
        self.relay.sync()
        if failed:
            self._ring_failed()

    def _ring_failed(self) -> None:
        if self.ring is not None and not self.health.broken:
            self.health.ring_broken(self.ring.vq.ring_error_text(), self.ring)


def _fd(fd: int | None) -> int:
    return -1 if fd is None else fd
