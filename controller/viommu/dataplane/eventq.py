"""The eventq: fault records into the buffers the driver posted (virtio spec 5.13.6.9).

The relay (viommu.events.relay) pushes records here as they arrive; when the driver posts
buffers (the ring starts, or it kicks) the records waiting in the relay's FIFO are pulled.
Linux posts eventq buffers without kicking, so the relay also pushes whenever an event is
due, and a ring without buffers simply refuses (the record waits).
"""

from __future__ import annotations

from viommu._dataplane import RingError
from viommu.dataplane.rings import DeviceHealth, Ring
from viommu.events.relay import EventRelay


class EventQueue:
    """The guest's eventq, whether or not its ring runs; the relay's sink."""

    def __init__(self, relay: EventRelay, health: DeviceHealth) -> None:
        self.relay = relay
        self.health = health
        self.ring: Ring | None = None
        relay.attach_sink(self)

    def started(self, ring: Ring) -> None:
        self.ring = ring
        self.relay.deliver()  # records that waited for the ring

    def stopped(self) -> None:
        self.ring = None

    def kicked(self) -> None:
        """The driver posted buffers: what waits in the FIFO goes out."""
        self.relay.deliver()

    def push(self, record: bytes) -> bool:
        if self.ring is None or self.health.broken:
            return False
        try:
            return self.ring.vq.push_event(record)
        except RingError as exc:
            self.health.ring_broken(str(exc), self.ring)
            return False

    def notify(self) -> None:
        if self.ring is not None and self.ring.vq.needs_interrupt():
            self.ring.notify()
