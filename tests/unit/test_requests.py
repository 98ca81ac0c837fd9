"""virtio-iommu requests end to end through the data plane: a chain posted by a driver, parsed
by ext/, served by the device, answered with the status and used length the spec gives.
Spec references: virtio 1.3, 5.13.6 (device requirements for each request type)."""

from __future__ import annotations

import struct

import pytest

from viommu.device.virtio_iommu import DeviceConfig, VirtioIommuDevice
from viommu.uapi import (
    VIRTIO_F_VERSION_1,
    VIRTIO_IOMMU_ATTACH_F_BYPASS,
    Feature,
    MapFlag,
    ProbeProperty,
    RequestType,
    ResvMemSubtype,
    Status,
)
from virtio_driver import FakeDriver

EP = 0x100
EP2 = 0x200
RW = MapFlag.READ | MapFlag.WRITE
ALL_FEATURES = (1 << VIRTIO_F_VERSION_1) | sum(1 << f for f in (
    Feature.F_INPUT_RANGE, Feature.F_DOMAIN_RANGE, Feature.F_MAP_UNMAP, Feature.F_PROBE,
    Feature.F_BYPASS_CONFIG))


def attach(domain: int, endpoint: int, flags: int = 0, reserved: int = 0) -> bytes:
    return struct.pack("<B3xIIII", RequestType.VIRTIO_IOMMU_T_ATTACH, domain, endpoint, flags,
                       reserved)


def detach(domain: int, endpoint: int, reserved: int = 0) -> bytes:
    return struct.pack("<B3xIIQ", RequestType.VIRTIO_IOMMU_T_DETACH, domain, endpoint, reserved)


def map_(domain: int, start: int, end: int, phys: int, flags: int = RW) -> bytes:
    return struct.pack("<B3xIQQQI", RequestType.VIRTIO_IOMMU_T_MAP, domain, start, end, phys,
                       flags)


def unmap(domain: int, start: int, end: int, reserved: int = 0) -> bytes:
    return struct.pack("<B3xIQQI", RequestType.VIRTIO_IOMMU_T_UNMAP, domain, start, end,
                       reserved)


def probe(endpoint: int) -> bytes:
    return struct.pack("<B3xI64x", RequestType.VIRTIO_IOMMU_T_PROBE, endpoint)


class Harness:
    def __init__(self, features: int = ALL_FEATURES, **config) -> None:
        self.driver = FakeDriver()
        self.device = VirtioIommuDevice([EP, EP2], DeviceConfig(**config))
        self.device.driver_features = features

    def submit(self, readable: bytes, writable_len: int = 4) -> tuple[int, bytes]:
        """(used length, the writable buffer after the device answered)."""
        head, wgpa = self.driver.post(readable, writable_len)
        assert self.driver.vq.process_requests(self.device.handle_request) == 1
        [(used_id, used_len)] = self.driver.take_used()
        assert used_id == head
        return used_len, self.driver.read(wgpa, writable_len) if writable_len else b""

    def status(self, readable: bytes) -> Status:
        used_len, tail = self.submit(readable)
        assert used_len == 4, f"used length {used_len}, the spec wants exactly the tail"
        assert tail[1:4] == b"\0\0\0", "tail reserved bytes must be zero"
        return Status(tail[0])

    def mappings(self, domain: int) -> list[tuple[int, int]]:
        return [(m.virt_start, m.virt_end) for m in self.device.domains[domain].mappings]


@pytest.fixture
def h() -> Harness:
    return Harness()


# --- framing -------------------------------------------------------------------------------


def test_unknown_request_type_is_returned_unwritten_with_used_length_0(h: Harness) -> None:
    used_len, buf = h.submit(struct.pack("<B3x16x", 0x42))
    assert used_len == 0
    assert buf == b"\xaa" * 4


def test_request_too_short_for_its_type_is_returned_unwritten(h: Harness) -> None:
    used_len, buf = h.submit(attach(1, EP)[:12])
    assert used_len == 0
    assert buf == b"\xaa" * 4


def test_request_without_room_for_the_tail_is_returned_with_used_length_0(h: Harness) -> None:
    used_len, _ = h.submit(attach(1, EP), writable_len=0)
    assert used_len == 0


def test_request_split_over_several_readable_descriptors_is_parsed(h: Harness) -> None:
    req = attach(7, EP)
    parts = [req[:3], req[3:11], req[11:]]
    segments = []
    for part in parts:
        gpa = h.driver.alloc(len(part))
        h.driver.write(gpa, part)
        segments.append((gpa, len(part), False))
    tail = h.driver.alloc(4)
    h.driver.publish(h.driver.add_chain(segments + [(tail, 4, True)]))
    h.driver.vq.process_requests(h.device.handle_request)
    assert h.driver.take_used()[0][1] == 4
    assert h.driver.read(tail, 1) == bytes([Status.S_OK])
    assert h.device.endpoints[EP].domain == 7


# --- ATTACH ---------------------------------------------------------------------------------


def test_attach_creates_the_domain_and_attaches(h: Harness) -> None:
    assert h.status(attach(1, EP)) == Status.S_OK
    assert h.device.domains[1].endpoints == {EP}
    assert h.device.endpoints[EP].domain == 1


def test_attach_with_nonzero_reserved_is_inval(h: Harness) -> None:
    assert h.status(attach(1, EP, reserved=1)) == Status.S_INVAL
    assert 1 not in h.device.domains


def test_attach_with_unknown_flag_is_inval(h: Harness) -> None:
    assert h.status(attach(1, EP, flags=1 << 5)) == Status.S_INVAL


def test_attach_bypass_flag_without_bypass_config_negotiated_is_inval() -> None:
    h = Harness(features=ALL_FEATURES & ~(1 << Feature.F_BYPASS_CONFIG))
    assert h.status(attach(1, EP, flags=VIRTIO_IOMMU_ATTACH_F_BYPASS)) == Status.S_INVAL


def test_attach_unknown_endpoint_is_noent(h: Harness) -> None:
    assert h.status(attach(1, 0x999)) == Status.S_NOENT


def test_attach_domain_outside_domain_range_is_range() -> None:
    h = Harness(domain_range=(1, 10))
    assert h.status(attach(11, EP)) == Status.S_RANGE


def test_attach_to_another_domain_detaches_implicitly_and_destroys_the_empty_one(
        h: Harness) -> None:
    h.status(attach(1, EP))
    h.status(map_(1, 0x1000, 0x1FFF, 0x5000))
    assert h.status(attach(2, EP)) == Status.S_OK
    assert h.device.endpoints[EP].domain == 2
    assert 1 not in h.device.domains


def test_attach_shares_a_domain_between_endpoints(h: Harness) -> None:
    h.status(attach(1, EP))
    assert h.status(attach(1, EP2)) == Status.S_OK
    assert h.device.domains[1].endpoints == {EP, EP2}


def test_attach_bypass_flag_inconsistent_with_the_domain_is_inval(h: Harness) -> None:
    h.status(attach(1, EP))
    assert h.status(attach(1, EP2, flags=VIRTIO_IOMMU_ATTACH_F_BYPASS)) == Status.S_INVAL
    h.status(attach(2, EP2, flags=VIRTIO_IOMMU_ATTACH_F_BYPASS))
    assert h.status(attach(2, EP)) == Status.S_INVAL


def test_attach_clears_a_sticky_config_fault(h: Harness) -> None:
    h.device.endpoints[EP].config_fault = "C_BAD_STE"
    h.status(attach(1, EP))
    assert h.device.endpoints[EP].config_fault is None


# --- DETACH ---------------------------------------------------------------------------------


def test_detach_last_endpoint_destroys_the_domain_and_its_mappings(h: Harness) -> None:
    h.status(attach(1, EP))
    h.status(map_(1, 0x1000, 0x1FFF, 0x5000))
    assert h.status(detach(1, EP)) == Status.S_OK
    assert h.device.domains == {}
    assert h.status(attach(1, EP)) == Status.S_OK
    assert h.mappings(1) == []


def test_detach_unknown_endpoint_is_noent(h: Harness) -> None:
    assert h.status(detach(1, 0x999)) == Status.S_NOENT


def test_detach_from_a_domain_the_endpoint_is_not_in_is_inval(h: Harness) -> None:
    assert h.status(detach(1, EP)) == Status.S_INVAL
    h.status(attach(1, EP))
    assert h.status(detach(2, EP)) == Status.S_INVAL


def test_detach_ignores_reserved(h: Harness) -> None:
    h.status(attach(1, EP))
    assert h.status(detach(1, EP, reserved=0xFFFF)) == Status.S_OK


# --- MAP ------------------------------------------------------------------------------------


@pytest.fixture
def attached(h: Harness) -> Harness:
    assert h.status(attach(1, EP)) == Status.S_OK
    return h


def test_map_adds_a_mapping(attached: Harness) -> None:
    assert attached.status(map_(1, 0x10000, 0x1FFFF, 0x80000)) == Status.S_OK
    assert attached.mappings(1) == [(0x10000, 0x1FFFF)]


def test_map_to_missing_domain_is_noent(attached: Harness) -> None:
    assert attached.status(map_(9, 0x1000, 0x1FFF, 0)) == Status.S_NOENT


@pytest.mark.parametrize("start,end,phys", [
    (0x1001, 0x1FFF, 0x5000),  # virt_start
    (0x1000, 0x1FFF, 0x5001),  # phys_start
    (0x1000, 0x1FFE, 0x5000),  # virt_end + 1
])
def test_map_unaligned_to_the_granule_is_range(attached: Harness, start: int, end: int,
                                               phys: int) -> None:
    assert attached.status(map_(1, start, end, phys)) == Status.S_RANGE


def test_map_overlapping_an_existing_mapping_is_inval(attached: Harness) -> None:
    attached.status(map_(1, 0x10000, 0x1FFFF, 0))
    assert attached.status(map_(1, 0x1F000, 0x20FFF, 0)) == Status.S_INVAL
    assert attached.mappings(1) == [(0x10000, 0x1FFFF)]


def test_map_with_unknown_flag_is_inval(attached: Harness) -> None:
    assert attached.status(map_(1, 0x1000, 0x1FFF, 0, flags=1 << 7)) == Status.S_INVAL


def test_map_mmio_flag_without_f_mmio_negotiated_is_inval(attached: Harness) -> None:
    assert attached.status(map_(1, 0x1000, 0x1FFF, 0, flags=MapFlag.MMIO)) == Status.S_INVAL


def test_map_on_a_bypass_domain_is_inval(h: Harness) -> None:
    h.status(attach(3, EP, flags=VIRTIO_IOMMU_ATTACH_F_BYPASS))
    assert h.status(map_(3, 0x1000, 0x1FFF, 0)) == Status.S_INVAL


def test_map_outside_the_input_range_is_range(attached: Harness) -> None:
    assert attached.status(map_(1, 1 << 48, (1 << 48) + 0xFFF, 0)) == Status.S_RANGE


def test_map_over_the_msi_window_is_inval(attached: Harness) -> None:
    assert attached.status(map_(1, 0xFEE00000, 0xFEE00FFF, 0)) == Status.S_INVAL


def test_map_with_end_before_start_is_inval(attached: Harness) -> None:
    assert attached.status(map_(1, 0x2000, 0x0FFF, 0)) == Status.S_INVAL


def test_map_without_map_unmap_negotiated_is_unsupp() -> None:
    h = Harness(features=ALL_FEATURES & ~(1 << Feature.F_MAP_UNMAP))
    h.status(attach(1, EP))
    assert h.status(map_(1, 0x1000, 0x1FFF, 0)) == Status.S_UNSUPP


# --- UNMAP: the spec's examples (1)-(7), ranges in pages -------------------------------------

P = 0x1000


def pages(first: int, last: int) -> tuple[int, int]:
    return first * P, (last + 1) * P - 1


@pytest.mark.parametrize("maps,unmap_range,status,left", [
    ([], (0, 4), Status.S_OK, []),                                        # (1)
    ([(0, 9)], (0, 9), Status.S_OK, []),                                  # (2)
    ([(0, 4), (5, 9)], (0, 9), Status.S_OK, []),                          # (3)
    ([(0, 9)], (0, 4), Status.S_RANGE, [(0, 9)]),                         # (4)
    ([(0, 4), (5, 9)], (0, 4), Status.S_OK, [(5, 9)]),                    # (5)
    ([(0, 4)], (0, 9), Status.S_OK, []),                                  # (6)
    ([(0, 4), (10, 14)], (0, 14), Status.S_OK, []),                       # (7)
], ids=[f"example-{i}" for i in range(1, 8)])
def test_unmap_spec_examples(attached: Harness, maps, unmap_range, status, left) -> None:
    for first, last in maps:
        assert attached.status(map_(1, *pages(first, last), 0)) == Status.S_OK
    assert attached.status(unmap(1, *pages(*unmap_range))) == status
    assert attached.mappings(1) == [pages(first, last) for first, last in left]


def test_unmap_that_would_split_removes_nothing_even_if_other_mappings_fit(
        attached: Harness) -> None:
    attached.status(map_(1, *pages(0, 4), 0))
    attached.status(map_(1, *pages(5, 9), 0))
    assert attached.status(unmap(1, *pages(0, 7))) == Status.S_RANGE
    assert attached.mappings(1) == [pages(0, 4), pages(5, 9)]


def test_unmap_missing_domain_is_noent(attached: Harness) -> None:
    assert attached.status(unmap(9, 0, 0xFFF)) == Status.S_NOENT


def test_unmap_with_nonzero_reserved_is_inval(attached: Harness) -> None:
    attached.status(map_(1, *pages(0, 0), 0))
    assert attached.status(unmap(1, *pages(0, 0), reserved=1)) == Status.S_INVAL


def test_unmap_on_a_bypass_domain_is_inval(h: Harness) -> None:
    h.status(attach(3, EP, flags=VIRTIO_IOMMU_ATTACH_F_BYPASS))
    assert h.status(unmap(3, 0, 0xFFF)) == Status.S_INVAL


# --- PROBE ----------------------------------------------------------------------------------


def test_probe_reports_the_msi_window_and_uses_exactly_probe_size_plus_4(h: Harness) -> None:
    size = h.device.config.probe_size
    used_len, buf = h.submit(probe(EP), writable_len=size + 4)
    assert used_len == size + 4
    kind, length, subtype, start, end = struct.unpack_from("<HHB3xQQ", buf)
    assert (kind, length, subtype) == (ProbeProperty.RESV_MEM, 20, ResvMemSubtype.MSI)
    assert (start, end) == (0xFEE00000, 0xFEEFFFFF)
    assert buf[24:size] == bytes(size - 24), "unused property bytes must be zero"
    assert buf[size] == Status.S_OK


def test_probe_unknown_endpoint_is_noent(h: Harness) -> None:
    size = h.device.config.probe_size
    used_len, buf = h.submit(probe(0x999), writable_len=size + 4)
    assert used_len == size + 4
    assert buf[size] == Status.S_NOENT


def test_probe_with_properties_buffer_smaller_than_probe_size_is_inval_without_properties(
        h: Harness) -> None:
    used_len, buf = h.submit(probe(EP), writable_len=64 + 4)
    assert used_len == 68
    assert buf[:64] == bytes(64)
    assert buf[64] == Status.S_INVAL


# --- config space ---------------------------------------------------------------------------


def test_config_space_layout() -> None:
    device = VirtioIommuDevice([EP], DeviceConfig(bypass=True))
    mask, in_start, in_end, d_start, d_end, probe_size, bypass = struct.unpack(
        "<QQQIIIB3x", device.config_bytes())
    assert mask == 0xFFFF_FFFF_FFFF_F000
    assert (in_start, in_end) == (0, (1 << 48) - 1)
    assert (d_start, d_end) == (0, 0xFFFF)
    assert probe_size == 512 and bypass == 1


def test_config_bypass_is_the_only_writable_field_and_only_bit_0_counts() -> None:
    device = VirtioIommuDevice([EP])
    before = device.config_bytes()
    device.write_config(0, b"\xff" * 36 + b"\x03")
    assert device.bypass is True
    assert device.config_bytes()[:36] == before[:36]


def test_device_reset_detaches_everything_and_keeps_bypass(h: Harness) -> None:
    h.device.bypass = True
    h.status(attach(1, EP))
    h.device.reset()
    assert h.device.domains == {}
    assert h.device.endpoints[EP].domain is None
    assert h.device.bypass is True
