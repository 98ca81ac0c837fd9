"""Translation for endpoints' DMA: the engine (ext/) kept equal to the device's state.

The device (domains, attachments, page-table bindings, config `bypass`) is the source of
truth; `Translator` listens to its changes and configures the engine's streams. Endpoints get
a `TranslatingDma` port: every byte of their DMA goes through `Engine.translate`, and a fault
stops the transfer, becomes an SMMUv3 event for the relay, and is reported to the endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from viommu._dataplane import READ, WRITE, Engine, GuestMemory
from viommu.device import VirtioIommuDevice
from viommu.endpoint import DmaFault
from viommu.smmuv3 import EventId, EventRecord

log = logging.getLogger("viommu.translation")

PAGE_SIZE = 4096


class Translator:
    def __init__(self, device: VirtioIommuDevice, submit_event: Callable[[EventRecord], None]
                 ) -> None:
        self.device = device
        self.submit_event = submit_event
        self.engine: Engine | None = None
        self.mem: GuestMemory | None = None
        # UNMAP needs no hook: removing from a MappingTable drops its cached translations.
        device.on_stream_change.append(self.sync_stream)
        device.on_invalidate.append(self._invalidate)

    def memory_changed(self, mem: GuestMemory) -> None:
        """A new memory table: the engine's stage 2 follows it; streams are re-applied."""
        if self.engine is None or self.mem is not mem:
            self.mem = mem
            self.engine = Engine(mem)
        for endpoint_id in self.device.endpoints:
            self.sync_stream(endpoint_id)

    def sync_stream(self, endpoint_id: int) -> None:
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

    def _invalidate(self, endpoint_id: int, iova: int, size: int) -> None:
        if self.engine is None:
            return
        if size:
            self.engine.invalidate_range(endpoint_id, iova, size)
        else:
            self.engine.invalidate_stream(endpoint_id)

    def dma_port(self, sid: int) -> TranslatingDma:
        return TranslatingDma(self, sid)


class TranslatingDma:
    """An endpoint's DMA through the vIOMMU (the endpoint module's DmaPort)."""

    def __init__(self, translator: Translator, sid: int) -> None:
        self.translator = translator
        self.sid = sid

    def copy(self, pasid: int | None, src: int, dst: int, length: int) -> DmaFault | None:
        t = self.translator
        if t.engine is None or t.mem is None:
            return DmaFault(EventId.F_STREAM_DISABLED, src, False, 0)
        ssid = -1 if pasid is None else pasid
        done = 0
        while done < length:
            chunk = min(PAGE_SIZE - (src + done) % PAGE_SIZE, PAGE_SIZE - (dst + done) % PAGE_SIZE,
                        length - done)
            src_gpa = self._translate(ssid, src + done, chunk, READ, done)
            if isinstance(src_gpa, DmaFault):
                return src_gpa
            dst_gpa = self._translate(ssid, dst + done, chunk, WRITE, done)
            if isinstance(dst_gpa, DmaFault):
                return dst_gpa
            t.mem.write(dst_gpa, t.mem.read(src_gpa, chunk))
            done += chunk
        return None

    def _translate(self, ssid: int, iova: int, size: int, access: int,
                   done: int) -> int | DmaFault:
        gpa, record = self.translator.engine.translate(self.sid, ssid, iova, size, access)
        if gpa is not None:
            return gpa
        write = access == WRITE
        if record is None:  # terminated without an event (STE abort, CD.R = 0)
            return DmaFault(EventId.F_TRANSLATION, iova, write, done)
        event = EventRecord.decode(record)
        self.translator.submit_event(event)
        log.info("DMA fault: %s sid=%#x iova=%#x %s", event.name, self.sid, iova,
                 "write" if write else "read")
        return DmaFault(event.event_id, iova, write, done)
