"""PRI on the endpoint's DMA path: pages stage 1 does not map become one page request group;
the transfer waits; Success retries through translation, Invalid Request fails the access,
Response Failure disables PRI for the function (PCIe)."""

from __future__ import annotations

import pytest

from pagetables import GuestRam
from test_requests import ALL_FEATURES, EP, attach, map_
from viommu.dataplane.loop import DeferredLoop
from viommu.dataplane.translation import Translator
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.endpoints.dma_engine import DmaFault, DmaPending
from viommu.endpoints.dma_port import PriState, TranslatingDma
from viommu.events.page_requests import PageRequestRelay, ResponseCode
from viommu.events.relay import EventRelay
from viommu.events.smmuv3 import EventId
from viommu.uapi import Status
from virtio_driver import FakeDriver

SRC, DST = 0x10000, 0x20000


class Silent:
    """An announcer nobody listens to."""

    def emit(self, event: str, data: dict) -> None:
        pass


class PriHarness:
    def __init__(self, pri_enabled: bool = True) -> None:
        self.ram = GuestRam(size=1 << 20)
        self.ram._next = self.ram.base + (512 << 10)  # the driver's rings use the first half
        self.driver = FakeDriver(ram=self.ram.buf, mem=self.ram.mem)
        self.device = VirtioIommuDevice([EP])
        self.device.driver_features = ALL_FEATURES
        self.events = EventRelay()
        self.translator = Translator(self.device, self.events)
        self.translator.memory_changed(self.ram.mem)
        self.page_requests = PageRequestRelay(self.events, Silent(), DeferredLoop(),
                                              policy="host")
        self.pri = PriState(enabled=pri_enabled)
        self.port = TranslatingDma(self.translator, EP, self.pri, self.page_requests)
        self.src = self.ram.alloc(0x3000)
        self.dst = self.ram.alloc(0x3000)
        self.ram.write(self.src, bytes(range(256)) * 48)
        assert self.request(attach(1, EP)) == Status.S_OK
        assert self.request(map_(1, SRC, SRC + 0x2FFF, self.src)) == Status.S_OK

    def request(self, body: bytes) -> Status:
        _, wgpa = self.driver.post(body, 4)
        self.driver.vq.process_requests(self.device.handle_request)
        self.driver.take_used()
        return Status(self.driver.read(wgpa, 1)[0])

    def the_group(self) -> dict:
        [group] = self.page_requests.pending.values()
        return group.to_dict()


@pytest.fixture
def h() -> PriHarness:
    return PriHarness()


def outcome_of(pending: DmaPending) -> list:
    seen = []
    pending.then(seen.append)
    return seen


def test_not_present_pages_become_one_group_and_the_transfer_waits(h: PriHarness) -> None:
    pending = h.port.copy(None, SRC, DST, 0x3000)
    assert isinstance(pending, DmaPending) and outcome_of(pending) == []
    group = h.the_group()
    assert [(r["address"], r["write"], r["last"]) for r in group["requests"]] == [
        (DST, True, False), (DST + 0x1000, True, False), (DST + 0x2000, True, True)]
    assert h.ram.read(h.dst, 0x3000) == bytes(0x3000)  # nothing copied yet


def test_success_after_a_host_side_fill_retries_and_completes(h: PriHarness) -> None:
    seen = outcome_of(h.port.copy(None, SRC, DST, 0x3000))
    assert h.request(map_(1, DST, DST + 0x2FFF, h.dst)) == Status.S_OK  # the fill
    h.page_requests.respond(h.the_group()["id"], ResponseCode.SUCCESS, "test")
    assert seen == [None]
    assert h.ram.read(h.dst, 0x3000) == h.ram.read(h.src, 0x3000)


def test_invalid_request_fails_the_access(h: PriHarness) -> None:
    seen = outcome_of(h.port.copy(None, SRC, DST, 0x1000))
    h.page_requests.respond(h.the_group()["id"], ResponseCode.INVALID_REQUEST, "test")
    assert seen == [DmaFault(EventId.F_TRANSLATION, DST, True, 0)]
    assert not h.pri.failed


def test_response_failure_disables_pri_for_the_function(h: PriHarness) -> None:
    seen = outcome_of(h.port.copy(None, SRC, DST, 0x1000))
    h.page_requests.respond(h.the_group()["id"], ResponseCode.RESPONSE_FAILURE, "test")
    assert isinstance(seen[0], DmaFault) and h.pri.failed
    requests = h.page_requests.requests
    fault = h.port.copy(None, SRC, DST, 0x1000)
    assert isinstance(fault, DmaFault) and fault.event_id == EventId.F_TRANSLATION
    assert h.page_requests.requests == requests  # no more page requests


def test_without_pri_a_not_present_page_faults_at_once() -> None:
    h = PriHarness(pri_enabled=False)
    fault = h.port.copy(None, SRC, DST, 0x1000)
    assert isinstance(fault, DmaFault) and h.page_requests.requests == 0
    assert h.events.pending == 1  # the F_TRANSLATION event went to the relay
