"""The ring walker against malformed rings and chains: every bad chain is returned with used
length 0 and nothing outside guest RAM is read or written; a corrupt ring raises RingError.
Also the eventq side: fault records go into driver-posted buffers, never split."""

from __future__ import annotations

import struct

import pytest

from viommu._dataplane import GuestMemory, GuestMemoryError, RingError, VirtQueue
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.uapi import RequestType
from virtio_driver import (
    GPA_BASE,
    UADDR_BASE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    FakeDriver,
)

ATTACH = struct.pack("<B3xIIII", RequestType.VIRTIO_IOMMU_T_ATTACH, 1, 0x100, 0, 0)


class RecordingDevice:
    """Fails the test if a malformed chain ever reaches the device."""

    def __init__(self) -> None:
        self.seen = []

    def __call__(self, req):
        self.seen.append(req)
        return 0, b""


@pytest.fixture
def drv() -> FakeDriver:
    return FakeDriver(queue_size=8)


def serve(drv: FakeDriver, device=None) -> list[tuple[int, int]]:
    drv.vq.process_requests(device or RecordingDevice())
    return drv.take_used()


def test_descriptor_loop_is_returned_with_used_length_0(drv: FakeDriver) -> None:
    buf = drv.alloc(16)
    drv.set_desc(0, buf, 8, VRING_DESC_F_NEXT, 1)
    drv.set_desc(1, buf, 8, VRING_DESC_F_NEXT, 0)
    drv.publish(0)
    device = RecordingDevice()
    assert serve(drv, device) == [(0, 0)]
    assert device.seen == []
    assert drv.vq.chains_malformed == 1


@pytest.mark.parametrize("addr,length", [
    (GPA_BASE - 0x1000, 16),            # below guest RAM
    (GPA_BASE + (1 << 20) - 8, 16),     # straddles the end of guest RAM
    (GPA_BASE, 0xFFFF_FFFF),            # huge length
    (0xFFFF_FFFF_FFFF_FFF0, 0x20),      # wraps around 2^64
])
def test_buffer_outside_guest_ram_is_never_touched(drv: FakeDriver, addr: int,
                                                   length: int) -> None:
    good = drv.alloc(24)
    drv.write(good, ATTACH)
    drv.set_desc(0, good, 20, VRING_DESC_F_NEXT, 1)
    drv.set_desc(1, addr, length, VRING_DESC_F_WRITE)
    drv.publish(0)
    device = RecordingDevice()
    assert serve(drv, device) == [(0, 0)]
    assert device.seen == []


def test_next_index_beyond_the_queue_is_malformed(drv: FakeDriver) -> None:
    buf = drv.alloc(24)
    drv.set_desc(0, buf, 20, VRING_DESC_F_NEXT, 8)
    drv.publish(0)
    assert serve(drv) == [(0, 0)]


def test_readable_descriptor_after_a_writable_one_is_malformed(drv: FakeDriver) -> None:
    buf = drv.alloc(24)
    drv.set_desc(0, buf, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
    drv.set_desc(1, buf, 20, 0)
    drv.publish(0)
    assert serve(drv) == [(0, 0)]


def test_indirect_descriptor_is_malformed_as_the_feature_is_not_offered(
        drv: FakeDriver) -> None:
    table = drv.alloc(32)
    drv.set_desc(0, table, 32, VRING_DESC_F_INDIRECT)
    drv.publish(0)
    assert serve(drv) == [(0, 0)]


def test_zero_length_descriptors_are_skipped(drv: FakeDriver) -> None:
    req, tail = drv.alloc(20), drv.alloc(4)
    drv.write(req, ATTACH[:20])
    drv.set_desc(0, 0xDEAD_0000_0000, 0, VRING_DESC_F_NEXT, 1)
    drv.set_desc(1, req, 20, VRING_DESC_F_NEXT, 2)
    drv.set_desc(2, tail, 4, VRING_DESC_F_WRITE)
    drv.publish(0)
    device = VirtioIommuDevice([0x100])
    assert serve(drv, device.handle_request) == [(0, 4)]


def test_head_index_beyond_the_queue_raises_ring_error(drv: FakeDriver) -> None:
    drv.publish(8)
    with pytest.raises(RingError, match="head index 8"):
        drv.vq.process_requests(RecordingDevice())


def test_avail_index_running_ahead_more_than_the_queue_size_raises_ring_error(
        drv: FakeDriver) -> None:
    drv.set_avail_idx(9)
    with pytest.raises(RingError, match="ahead"):
        drv.vq.process_requests(RecordingDevice())


def test_a_handler_exception_still_returns_the_chain(drv: FakeDriver) -> None:
    drv.post(ATTACH, 4)

    def broken(req):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        drv.vq.process_requests(broken)
    assert drv.take_used() == [(0, 0)]


def test_many_requests_wrap_the_16_bit_ring_indices() -> None:
    drv = FakeDriver(queue_size=4)
    device = VirtioIommuDevice([0x100])
    for _ in range(70000 // 4):
        for _ in range(4):
            drv.post(ATTACH, 4)
            drv._next_data = 0x10000  # reuse the same data area
        drv.vq.process_requests(device.handle_request)
        assert [length for _, length in drv.take_used()] == [4] * 4
    assert drv.vq.used_idx == 70000 % 65536


def test_ring_outside_the_memory_table_does_not_start() -> None:
    mem = GuestMemory()
    mem.add_region(0, 0x10000, UADDR_BASE, bytearray(0x10000))
    vq = VirtQueue(mem, 0)
    vq.set_num(64)
    vq.set_addr(UADDR_BASE + 0xFF00, UADDR_BASE, UADDR_BASE + 0x2000)
    with pytest.raises(ValueError, match="outside the memory table"):
        vq.start()


@pytest.mark.parametrize("num", [0, 3, 65536])
def test_queue_size_must_be_a_power_of_two_up_to_32768(num: int) -> None:
    vq = VirtQueue(GuestMemory(), 0)
    with pytest.raises((ValueError, OverflowError)):
        vq.set_num(num)


def test_guest_memory_read_outside_regions_raises() -> None:
    mem = GuestMemory()
    mem.add_region(0x1000, 0x1000, 0, bytearray(0x1000))
    assert mem.read(0x1000, 4) == b"\0" * 4
    with pytest.raises(GuestMemoryError):
        mem.read(0x1FFE, 4)


# --- eventq ---------------------------------------------------------------------------------

RECORD = bytes(range(24))


def post_event_buffer(drv: FakeDriver, size: int = 24) -> int:
    gpa = drv.alloc(size)
    drv.publish(drv.add_chain([(gpa, size, True)]))
    return gpa


def test_push_event_without_a_posted_buffer_returns_false(drv: FakeDriver) -> None:
    assert drv.vq.push_event(RECORD) is False


def test_push_event_writes_the_record_and_uses_24_bytes(drv: FakeDriver) -> None:
    gpa = post_event_buffer(drv)
    assert drv.vq.push_event(RECORD) is True
    assert drv.take_used() == [(0, 24)]
    assert drv.read(gpa, 24) == RECORD


def test_push_event_skips_a_too_small_buffer_without_splitting_the_record(
        drv: FakeDriver) -> None:
    small = post_event_buffer(drv, 16)
    good = post_event_buffer(drv, 24)
    assert drv.vq.push_event(RECORD) is True
    assert drv.take_used() == [(0, 0), (1, 24)]
    assert drv.read(small, 16) == b"\xaa" * 16
    assert drv.read(good, 24) == RECORD
    assert drv.vq.buffers_too_small == 1


def test_push_event_fills_a_buffer_made_of_two_descriptors(drv: FakeDriver) -> None:
    a, b = drv.alloc(10), drv.alloc(14)
    drv.publish(drv.add_chain([(a, 10, True), (b, 14, True)]))
    assert drv.vq.push_event(RECORD) is True
    assert drv.read(a, 10) + drv.read(b, 14) == RECORD


def test_needs_interrupt_follows_the_drivers_no_interrupt_flag(drv: FakeDriver) -> None:
    assert drv.vq.needs_interrupt() is True
    drv.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    assert drv.vq.needs_interrupt() is False
