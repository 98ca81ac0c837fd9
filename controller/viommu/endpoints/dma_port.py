"""An endpoint's DMA through the vIOMMU: every byte goes through the translation engine.

`TranslatingDma` is the DMA port the endpoint models use (viommu.endpoints.dma_engine's
DmaPort). A fault stops the transfer where it happened (the pages before it are copied, as a
real DMA would), becomes an SMMUv3 event for the relay, and is reported to the endpoint.
With PCIe PRI active, pages stage 1 does not map yet are asked for with one page request
group first (PCIe 6.x 10.4), and the transfer waits for its response.
"""

from __future__ import annotations

import dataclasses
import logging

from viommu._dataplane import READ, WRITE
from viommu.dataplane.translation import Translator
from viommu.endpoints.dma_engine import DmaFault, DmaPending
from viommu.events.page_requests import PRG_INDEX_BITS, PageRequest, PageRequestRelay, ResponseCode
from viommu.events.smmuv3 import EventClass, EventId, EventRecord

log = logging.getLogger(__name__)

PAGE_SIZE = 4096


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
        self.translator.fault(event)
        log.info("DMA fault: %s sid=%#x iova=%#x %s", event.name, self.sid, iova,
                 "write" if write else "read")
        return DmaFault(event.event_id, iova, write, done)


def _stage1_not_present(event: EventRecord) -> bool:
    """A translation fault on the input address at stage 1: what PRI can resolve."""
    return (event.event_id == EventId.F_TRANSLATION and not event.s2
            and event.event_class == EventClass.IN)
