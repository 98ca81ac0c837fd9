"""PAGE_RESP and the extended fault record (viommu's private VIOMMU_F_PAGE_REQUEST) at the
virtqueue level: a guest that can answer gets PASID and group ID, and its answer reaches the
waiting group; without the feature, neither exists."""

from __future__ import annotations

import struct

import pytest

from test_requests import ALL_FEATURES, EP, Harness
from viommu.events.faults import fault_from_page_request
from viommu.events.page_requests import PageRequest
from viommu.uapi import (
    PAGE_RESP_F_PASID_VALID,
    VIOMMU_F_PAGE_REQUEST,
    ExtFaultFlag,
    FaultFlag,
    PageRespCode,
    RequestType,
    Status,
)
from virtio_driver import FakeDriver

FEATURES = ALL_FEATURES | 1 << VIOMMU_F_PAGE_REQUEST


class Responder:
    """Plays the page-request relay: keeps what the guest answered; group 5 is waiting."""

    def __init__(self, answers: list) -> None:
        self.answers = answers

    def guest_response(self, *args) -> bool:
        self.answers.append(args)
        return args[2] == 5


def page_resp(endpoint: int, grpid: int, code: int, pasid: int | None = None,
              reserved: int = 0, flags: int | None = None) -> bytes:
    if flags is None:
        flags = PAGE_RESP_F_PASID_VALID if pasid is not None else 0
    return struct.pack("<B3xIIHHII", RequestType.VIRTIO_IOMMU_T_PAGE_RESP, endpoint, pasid or 0,
                       grpid, code, flags, reserved)


@pytest.fixture
def h() -> Harness:
    h = Harness(features=FEATURES)
    h.answers = []
    h.device.page_responder = Responder(h.answers)
    return h


def test_page_resp_reaches_the_waiting_group(h: Harness) -> None:
    assert h.status(page_resp(EP, 5, PageRespCode.SUCCESS, pasid=9)) == Status.S_OK
    assert h.answers == [(EP, 9, 5, PageRespCode.SUCCESS)]


def test_page_resp_without_pasid_valid_carries_no_pasid(h: Harness) -> None:
    h.status(page_resp(EP, 5, PageRespCode.INVALID))
    assert h.answers == [(EP, None, 5, PageRespCode.INVALID)]


def test_page_resp_for_no_waiting_group_is_noent(h: Harness) -> None:
    assert h.status(page_resp(EP, 6, PageRespCode.SUCCESS)) == Status.S_NOENT


@pytest.mark.parametrize("body", [
    page_resp(EP, 5, 7),                      # unknown code
    page_resp(EP, 5, 0, reserved=1),          # reserved
    page_resp(EP, 5, 0, flags=1 << 4),        # unknown flag
], ids=["code", "reserved", "flags"])
def test_malformed_page_resp_is_inval(h: Harness, body: bytes) -> None:
    assert h.status(body) == Status.S_INVAL and h.answers == []


def test_page_resp_for_an_unknown_endpoint_is_noent(h: Harness) -> None:
    assert h.status(page_resp(0x999, 5, 0)) == Status.S_NOENT


def test_page_resp_without_the_feature_is_unrecognised() -> None:
    h = Harness(features=ALL_FEATURES)
    assert h.submit(page_resp(EP, 5, 0))[0] == 0


def test_extended_record_keeps_pasid_and_group_for_a_guest_that_answers() -> None:
    request = PageRequest(EP, 0x1AB, 0x7000, last=True, read=False, write=True, priv=True,
                          pasid=0x12345)
    record = fault_from_page_request(request).encode(extended=True)
    reason, flags, endpoint, pasid, address, grpid = struct.unpack("<B3xIIIQH6x", record)
    assert (reason, endpoint, pasid, address, grpid) == (2, EP, 0x12345, 0x7000, 0x1AB)
    assert flags == (FaultFlag.ADDRESS | FaultFlag.WRITE | ExtFaultFlag.PASID
                     | ExtFaultFlag.PAGE_REQUEST | ExtFaultFlag.LAST | ExtFaultFlag.PRIV)


def test_plain_record_for_upstream_drivers_keeps_only_spec_flags() -> None:
    request = PageRequest(EP, 3, 0x7000, last=True, read=True, write=False, pasid=4)
    record = fault_from_page_request(request).encode()
    reason, reserved, flags, endpoint, reserved1, address = struct.unpack("<B3sIIIQ", record)
    assert len(record) == 24 and reserved == b"\0\0\0" and reserved1 == 0
    assert flags == FaultFlag.ADDRESS | FaultFlag.READ


def test_an_extended_record_is_never_split_into_a_24_byte_buffer() -> None:
    driver = FakeDriver()
    small, big = driver.alloc(24), driver.alloc(32)
    driver.publish(driver.add_chain([(small, 24, True)]))
    driver.publish(driver.add_chain([(big, 32, True)]))
    record = fault_from_page_request(
        PageRequest(EP, 1, 0x1000, last=True, read=True, write=False)).encode(extended=True)
    assert driver.vq.push_event(record) is True
    assert driver.take_used() == [(0, 0), (1, 32)]
