"""Translation for endpoints' DMA: the engine (ext/) kept equal to the device's state.

The device (domains, attachments, page-table bindings, config `bypass`) is the source of
truth; `Translator` listens to its changes and configures the engine's streams. Endpoints get
a `TranslatingDma` port: every byte of their DMA goes through `Engine.translate`, and a fault
stops the transfer, becomes an SMMUv3 event for the relay, and is reported to the endpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable

from viommu._dataplane import READ, WRITE, Engine, GuestMemory
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.endpoints.dma_engine import DmaFault, DmaPending
from viommu.events.page_requests import PageRequestRelay
from viommu.events.pri import PRG_INDEX_BITS, PageRequest, ResponseCode
from viommu.events.smmuv3 import EventClass, EventId, EventRecord

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
DMA_TRACE_LEN = 1024


class Translator:
    def __init__(self, device: VirtioIommuDevice, submit_event: Callable[[EventRecord], None]
                 ) -> None:
        self.device = device
        self.submit_event = submit_event
        self.engine: Engine | None = None
        self.mem: GuestMemory | None = None
        # One entry per endpoint transfer (not per page): what `viommu trace` shows.
        self.dma_trace: deque[dict] = deque(maxlen=DMA_TRACE_LEN)
        self.dma_count = 0
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

    def note_dma(self, sid: int, ssid: int, src: int, dst: int, length: int, done: int) -> None:
        self.dma_count += 1
        self.dma_trace.append({"seq": self.dma_count, "time": time.time(), "sid": sid,
                               "pasid": None if ssid < 0 else ssid, "src": src, "dst": dst,
                               "length": length, "done": done})

    def dma_port(self, sid: int, pri: PriState | None = None,
                 page_requests: PageRequestRelay | None = None) -> TranslatingDma:
        return TranslatingDma(self, sid, pri, page_requests)


@dataclasses.dataclass
class PriState:
    """PCIe PRI of one function: enabled by the controller; a Response Failure disables it
    (PCIe: the function stops issuing page requests until software re-enables PRI)."""

    enabled: bool = False
    failed: bool = False
    next_grpid: int = 0

    @property
    def active(self) -> bool:
        return self.enabled and not self.failed

    def allocate_grpid(self) -> int:
        grpid = self.next_grpid
        self.next_grpid = (grpid + 1) % (1 << PRG_INDEX_BITS)
        return grpid

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "failed": self.failed}


class TranslatingDma:
    """An endpoint's DMA through the vIOMMU (the endpoint module's DmaPort). With PRI active,
    pages that stage 1 does not map yet are asked for with one page request group first, and
    the transfer waits for its response."""

    def __init__(self, translator: Translator, sid: int, pri: PriState | None = None,
                 page_requests: PageRequestRelay | None = None) -> None:
        self.translator = translator
        self.sid = sid
        self.pri = pri
        self.page_requests = page_requests

    def copy(self, pasid: int | None, src: int, dst: int,
             length: int) -> DmaFault | DmaPending | None:
        t = self.translator
        if t.engine is None or t.mem is None:
            return DmaFault(EventId.F_STREAM_DISABLED, src, False, 0)
        ssid = -1 if pasid is None else pasid
        if self.pri is not None and self.pri.active and self.page_requests is not None:
            missing = self._not_present(ssid, src, dst, length)
            if missing:
                return self._request_pages(pasid, missing, src, dst, length)
        return self._copy_now(ssid, src, dst, length)

    def _not_present(self, ssid: int, src: int, dst: int, length: int) -> list[tuple[int, bool]]:
        """(page, write) for every page of the transfer that stage 1 does not map: what a
        PRI-capable function asks for before it accesses memory."""
        missing: list[tuple[int, bool]] = []
        for base, write in ((src, False), (dst, True)):
            page = base & ~(PAGE_SIZE - 1)
            while page < base + length:
                _, record = self.translator.engine.translate(
                    self.sid, ssid, max(page, base), 1, WRITE if write else READ)
                if record is not None and _stage1_not_present(EventRecord.decode(record)):
                    missing.append((page, write))
                page += PAGE_SIZE
        return missing

    def _request_pages(self, pasid: int | None, missing: list[tuple[int, bool]], src: int,
                       dst: int, length: int) -> DmaPending:
        pending = DmaPending()
        grpid = self.pri.allocate_grpid()
        first_page, first_write = missing[0]

        def on_response(code: ResponseCode) -> None:
            if code == ResponseCode.SUCCESS:  # pages resident: retry through translation
                pending.complete(self._copy_now(-1 if pasid is None else pasid, src, dst,
                                                length))
                return
            if code == ResponseCode.RESPONSE_FAILURE:
                self.pri.failed = True
                log.warning("sid %#x: Response Failure: PRI disabled for the function",
                            self.sid)
            pending.complete(DmaFault(EventId.F_TRANSLATION, first_page, first_write, 0))

        for i, (page, write) in enumerate(missing):
            request = PageRequest(self.sid, grpid, page, last=i == len(missing) - 1,
                                  read=not write, write=write, pasid=pasid)
            self.page_requests.submit(request, on_response)
        return pending

    def _copy_now(self, ssid: int, src: int, dst: int, length: int) -> DmaFault | None:
        """Copy through translation in C; a fault stops the transfer where it happened (the
        pages before it are copied, as a real DMA would) and goes to the relay."""
        done, record, iova, write = self.translator.engine.dma_copy(self.sid, ssid, src, dst,
                                                                    length)
        self.translator.note_dma(self.sid, ssid, src, dst, length, done)
        if done == length:
            return None
        if record is None:  # terminated without an event (STE abort, CD.R = 0)
            return DmaFault(EventId.F_TRANSLATION, iova, write, done)
        event = EventRecord.decode(record)
        self.translator.submit_event(event)
        log.info("DMA fault: %s sid=%#x iova=%#x %s", event.name, self.sid, iova,
                 "write" if write else "read")
        return DmaFault(event.event_id, iova, write, done)


def _stage1_not_present(event: EventRecord) -> bool:
    """A translation fault on the input address at stage 1: what PRI can resolve."""
    return (event.event_id == EventId.F_TRANSLATION and not event.s2
            and event.event_class == EventClass.IN)
