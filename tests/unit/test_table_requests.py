"""ATTACH_TABLE and INVALIDATE (the page-table extension under viommu's private feature bit,
digest §B.4 layouts) at the virtqueue level: parsed by ext/, served by the device, and
reaching the translation engine."""

from __future__ import annotations

import struct

import pytest

from pagetables import GuestRam, Stage1Tables, cd, ste
from test_requests import ALL_FEATURES, EP, EP2, Harness, attach, map_
from viommu import _dataplane as hw
from viommu.dataplane.translation import Translator
from viommu.device.observers import DeviceObserver
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.events.smmuv3 import EventId, EventRecord
from viommu.uapi import (
    VIOMMU_F_ATTACH_TABLE,
    InvalidateCache,
    InvalidateScope,
    RequestType,
    Status,
    TableFormat,
)
from virtio_driver import FakeDriver

TABLE_FEATURES = ALL_FEATURES | 1 << VIOMMU_F_ATTACH_TABLE
STE = (0x4008_0001 | 5 << 1, 0)  # V, Config = S1 translate, CD table at 0x40080000


def attach_table(domain: int, endpoint: int, words: tuple[int, int] = STE,
                 fmt: int = TableFormat.ARM_SMMU3, reserved: bytes = b"") -> bytes:
    body = struct.pack("<B3xIIB3xQQ", RequestType.VIRTIO_IOMMU_T_ATTACH_TABLE, domain, endpoint,
                       fmt, *words)
    return body + reserved.ljust(92, b"\0")


def invalidate(domain: int, scope: int = InvalidateScope.DOMAIN,
               caches: int = InvalidateCache.TLB, address: int = 0, nr_pages: int = 0,
               page_size: int = 12, flags: int = 0, reserved: bytes = b"") -> bytes:
    return struct.pack("<B3xBBHIIQQQB", RequestType.VIRTIO_IOMMU_T_INVALIDATE, scope, caches,
                       flags, domain, 0, 0, address, nr_pages, page_size) + \
        reserved.ljust(19, b"\0")


@pytest.fixture
def h() -> Harness:
    return Harness(features=TABLE_FEATURES)


def test_attach_table_binds_the_endpoint_to_the_ste_words(h: Harness) -> None:
    assert h.status(attach_table(5, EP)) == Status.S_OK
    assert h.device.endpoints[EP].table == STE
    assert h.device.endpoint_state(EP)["mode"] == "page-table"
    assert h.device.domains[5].table == STE


def test_table_requests_without_the_private_feature_are_unrecognised() -> None:
    h = Harness(features=ALL_FEATURES)
    assert h.submit(attach_table(5, EP))[0] == 0
    assert h.submit(invalidate(5))[0] == 0


def test_attach_table_with_nonzero_reserved_is_inval(h: Harness) -> None:
    assert h.status(attach_table(5, EP, reserved=b"\1")) == Status.S_INVAL


def test_attach_table_with_an_unknown_format_is_unsupp(h: Harness) -> None:
    assert h.status(attach_table(5, EP, fmt=2)) == Status.S_UNSUPP


def test_attach_table_unknown_endpoint_is_noent(h: Harness) -> None:
    assert h.status(attach_table(5, 0x999)) == Status.S_NOENT


def test_table_and_map_domains_do_not_mix(h: Harness) -> None:
    h.status(attach(1, EP))
    assert h.status(attach_table(1, EP2)) == Status.S_INVAL
    h.status(attach_table(5, EP2))
    assert h.status(attach(5, EP)) == Status.S_INVAL
    assert h.status(map_(5, 0x1000, 0x1FFF, 0)) == Status.S_INVAL


def test_attach_table_with_new_words_rebinds_every_endpoint_of_the_domain(h: Harness) -> None:
    h.status(attach_table(5, EP))
    h.status(attach_table(5, EP2, words=(STE[0] | 1 << 59, 0)))
    assert h.device.endpoints[EP].table == h.device.endpoints[EP2].table == (STE[0] | 1 << 59, 0)


@pytest.mark.parametrize("request_bytes,status", [
    (invalidate(9), Status.S_NOENT),
    (invalidate(5, scope=4), Status.S_INVAL),
    (invalidate(5, caches=1 << 5), Status.S_INVAL),
    (invalidate(5, flags=1 << 9), Status.S_INVAL),
    (invalidate(5, reserved=b"\1"), Status.S_INVAL),
    (invalidate(5, scope=InvalidateScope.ADDRESS, nr_pages=1, page_size=0), Status.S_INVAL),
    (invalidate(5, scope=InvalidateScope.ADDRESS, nr_pages=0), Status.S_INVAL),
], ids=["no-domain", "scope", "caches", "flags", "reserved", "page-size", "no-pages"])
def test_invalidate_rejects_bad_requests(h: Harness, request_bytes: bytes, status) -> None:
    h.status(attach_table(5, EP))
    assert h.status(request_bytes) == status


def test_invalidate_of_a_map_domain_is_inval(h: Harness) -> None:
    h.status(attach(1, EP))
    assert h.status(invalidate(1)) == Status.S_INVAL


class InvalidationLog(DeviceObserver):
    def __init__(self, seen: list) -> None:
        self.seen = seen

    def translations_invalidated(self, endpoint_id: int, iova: int, size: int) -> None:
        self.seen.append((endpoint_id, iova, size))


def test_invalidate_address_reaches_every_endpoint_of_the_domain(h: Harness) -> None:
    seen = []
    h.device.observe(InvalidationLog(seen))
    h.status(attach_table(5, EP))
    h.status(attach_table(5, EP2))
    assert h.status(invalidate(5, scope=InvalidateScope.ADDRESS, address=0x10000,
                               nr_pages=3)) == Status.S_OK
    assert seen == [(EP, 0x10000, 0x3000), (EP2, 0x10000, 0x3000)]


def test_invalidate_of_context_descriptors_clears_a_sticky_config_fault(h: Harness) -> None:
    h.status(attach_table(5, EP))
    h.device.endpoints[EP].config_fault = "C_BAD_CD"
    assert h.status(invalidate(5, caches=InvalidateCache.PASID)) == Status.S_OK
    assert h.device.endpoints[EP].config_fault is None


# --- through the engine: the guest's tables, cached translations, INVALIDATE -----------------


class TableGuest:
    """Rings and SMMUv3 tables in one guest RAM; the device drives a real engine."""

    def __init__(self) -> None:
        self.ram = GuestRam(size=1 << 20)
        self.ram._next = self.ram.base + (512 << 10)  # the driver's rings use the first half
        self.driver = FakeDriver(ram=self.ram.buf, mem=self.ram.mem)
        self.device = VirtioIommuDevice([EP])
        self.device.driver_features = TABLE_FEATURES
        self.translator = Translator(self.device, relay=None)
        self.translator.memory_changed(self.ram.mem)
        self.tables = Stage1Tables(self.ram)
        self.cd_gpa = self.ram.alloc(64, 64)
        self.ram.write(self.cd_gpa, cd(ttb0=self.tables.root, t0sz=16, asid=3))
        self.page_a, self.page_b = self.ram.alloc(4096), self.ram.alloc(4096)

    def request(self, body: bytes) -> Status:
        _, wgpa = self.driver.post(body, 4)
        self.driver.vq.process_requests(self.device.handle_request)
        self.driver.take_used()
        return Status(self.driver.read(wgpa, 1)[0])

    def translate(self, iova: int):
        gpa, record = self.translator.engine.translate(EP, -1, iova, 4, hw.READ)
        return gpa if record is None else EventRecord.decode(record).name


@pytest.fixture
def tg() -> TableGuest:
    return TableGuest()


def test_attach_table_request_makes_dma_walk_the_guests_tables(tg: TableGuest) -> None:
    tg.tables.map(0x10000, tg.page_a)
    assert tg.request(attach_table(5, EP, ste(tg.cd_gpa))) == Status.S_OK
    assert tg.translate(0x10008) == tg.page_a + 8


def test_a_stale_translation_stays_cached_until_invalidate_drops_it(tg: TableGuest) -> None:
    tg.tables.map(0x10000, tg.page_a)
    tg.request(attach_table(5, EP, ste(tg.cd_gpa)))
    assert tg.translate(0x10000) == tg.page_a
    tg.tables.map(0x10000, tg.page_b)  # the guest rewrites the PTE...
    assert tg.translate(0x10000) == tg.page_a  # ...which is cached, as on hardware
    assert tg.request(invalidate(5, scope=InvalidateScope.ADDRESS, address=0x10000,
                                 nr_pages=1)) == Status.S_OK
    assert tg.translate(0x10000) == tg.page_b


def test_invalidate_of_context_descriptors_lets_a_fixed_cd_be_read_again(tg: TableGuest) -> None:
    tg.tables.map(0x10000, tg.page_a)
    tg.ram.write(tg.cd_gpa, cd(ttb0=tg.tables.root, t0sz=16, valid=False))
    tg.request(attach_table(5, EP, ste(tg.cd_gpa)))
    assert tg.translate(0x10000) == EventId.C_BAD_CD.name
    tg.ram.write(tg.cd_gpa, cd(ttb0=tg.tables.root, t0sz=16))
    assert tg.translate(0x10000) == EventId.C_BAD_CD.name  # sticky
    tg.request(invalidate(5, caches=InvalidateCache.PASID))
    assert tg.translate(0x10000) == tg.page_a
