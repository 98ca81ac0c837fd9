"""The translation engine (ext/) kept equal to the device's state.

The device (domains, attachments, page-table bindings, config `bypass`) is the source of
truth; `Translator` observes it and configures the engine's streams. Endpoints reach the
engine through their DMA port (viommu.endpoints.dma_port); a fault their DMA raises goes to
the event relay from here.
"""

from __future__ import annotations

import time
from collections import deque

from viommu._dataplane import Engine, GuestMemory
from viommu.device.observers import DeviceObserver
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.events.relay import EventRelay
from viommu.events.smmuv3 import EventRecord, is_config_event

DMA_TRACE_LEN = 1024


class Translator(DeviceObserver):
    """Configures the engine's streams as the device changes, and relays endpoints' DMA
    faults."""

    def __init__(self, device: VirtioIommuDevice, relay: EventRelay | None) -> None:
        """`relay`: where DMA faults go (None: nowhere, for benchmarks of the engine)."""
        self.device = device
        self.relay = relay
        self.engine: Engine | None = None
        self.mem: GuestMemory | None = None
        # One entry per endpoint transfer (not per page): what `viommu trace` shows.
        self.dma_trace: deque[dict] = deque(maxlen=DMA_TRACE_LEN)
        self.dma_count = 0
        # UNMAP needs no hook: removing from a MappingTable drops its cached translations.
        device.observe(self)

    def memory_changed(self, mem: GuestMemory) -> None:
        """A new memory table: the engine's stage 2 follows it; streams are re-applied."""
        if self.engine is None or self.mem is not mem:
            self.mem = mem
            self.engine = Engine(mem)
        for endpoint_id in self.device.endpoints:
            self.stream_changed(endpoint_id)

    def stream_changed(self, endpoint_id: int) -> None:
        engine = self.engine
        if engine is None:
            return
        ep = self.device.endpoints.get(endpoint_id)
        if ep is None:
            engine.clear_stream(endpoint_id)
        elif ep.table is not None:
            engine.set_stream_table(endpoint_id, *ep.table)
        elif ep.domain is not None:
            domain = self.device.domains[ep.domain]
            if domain.bypass:
                engine.set_stream_bypass(endpoint_id)
            else:
                engine.set_stream_map(endpoint_id, domain.mappings, domain.domain_id)
        elif self.device.bypass:
            engine.set_stream_bypass(endpoint_id)
        else:
            engine.set_stream_blocked(endpoint_id)

    def translations_invalidated(self, endpoint_id: int, iova: int, size: int) -> None:
        if self.engine is None:
            return
        if size:
            self.engine.invalidate_range(endpoint_id, iova, size)
        else:
            self.engine.invalidate_stream(endpoint_id)

    def fault(self, event: EventRecord) -> None:
        """A fault raised by an endpoint's real DMA: relayed like an injected event."""
        if is_config_event(event.event_id):
            self.device.note_config_fault(event.sid, event.name)
        if self.relay is not None:
            self.relay.submit(event)

    def note_dma(self, sid: int, ssid: int, src: int, dst: int, length: int, done: int) -> None:
        self.dma_count += 1
        self.dma_trace.append({"seq": self.dma_count, "time": time.time(), "sid": sid,
                               "pasid": None if ssid < 0 else ssid, "src": src, "dst": dst,
                               "length": length, "done": done})
