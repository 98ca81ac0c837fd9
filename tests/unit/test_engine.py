"""The translation engine (ext/engine.pxi) and its pure-Python oracle.

Targeted tests run against both `Engine` and `ReferenceEngine`: each fault type and record
field, each granule, TTB0/TTB1, blocks, permissions, CD tables, STE/CD config checks,
stickiness, stage 2 and the IOTLB. A hypothesis test then checks that on random tables,
mappings and overlays the engine, cached or not, always answers as the oracle does.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagetables import (
    GPA_BASE,
    GuestRam,
    Stage1Tables,
    cd,
    l1cd,
    ste,
    table_stream,
)
from viommu import _dataplane as hw
from viommu._dataplane import EXEC, PRIV, READ, WRITE, Engine
from viommu.device.mappings import Mapping, MappingTable
from viommu.events.smmuv3 import EventClass, EventId, EventRecord
from viommu.testing.reference_walk import ReferenceEngine
from viommu.uapi import MapFlag

SID = 0x100
PAGE = 4096
RAM_PAGE = GPA_BASE + 0x10_0000   # a data page well past the tables the builders allocate
RW = int(MapFlag.READ | MapFlag.WRITE)


@pytest.fixture(params=[Engine, ReferenceEngine], ids=["engine", "reference"])
def make(request):
    return request.param


@pytest.fixture
def ram() -> GuestRam:
    return GuestRam()


def ok(result) -> int:
    gpa, record = result
    assert record is None and gpa is not None, \
        f"expected a translation, got {EventRecord.decode(record) if record else record}"
    return gpa


def fault(result) -> EventRecord:
    gpa, record = result
    assert gpa is None and record is not None, f"expected a fault, got gpa={gpa!r}"
    return EventRecord.decode(record)


# --- spec constants pinned to literal values from Linux arm-smmu-v3.h and the Arm ARM ----------

def test_structure_fields_match_linux_definitions() -> None:
    assert (hw.CD_0_V, hw.CD_0_AA64, hw.CD_0_S, hw.CD_0_R, hw.CD_0_A) == (31, 41, 44, 45, 46)
    assert (hw.CD_0_EPD0, hw.CD_0_EPD1, hw.CD_0_ENDI, hw.CD_0_TBI0) == (14, 30, 15, 38)
    assert (hw.CD_0_HD, hw.CD_0_HA) == (42, 43)
    assert (hw.CD_0_IPS_MSB, hw.CD_0_IPS_LSB) == (34, 32)
    assert (hw.CD_0_ASID_MSB, hw.CD_0_ASID_LSB) == (63, 48)
    assert (hw.CD_1_TTB_MSB, hw.CD_1_TTB_LSB) == (51, 4)  # CTXDESC_CD_1_TTB0_MASK
    assert (hw.STE_0_S1CONTEXTPTR_MSB, hw.STE_0_S1CONTEXTPTR_LSB) == (51, 6)
    assert (hw.STE_0_S1CDMAX_MSB, hw.STE_0_S1CDMAX_LSB, hw.STE_0_S1FMT_LSB) == (63, 59, 4)
    assert (hw.CTXDESC_L1_DESC_L2PTR_LSB, hw.CTXDESC_SPLIT_64K) == (12, 10)
    assert (hw.DESC_AF, hw.DESC_AP1, hw.DESC_AP2, hw.DESC_PXN, hw.DESC_UXN) == (10, 6, 7, 53, 54)
    word0 = struct.unpack("<Q", cd(ttb0=0x1000, asid=0xBEEF, epd1=True)[:8])[0]
    assert word0 & (1 << 31) and word0 & (1 << 41) and word0 >> 48 == 0xBEEF


# --- modes without page tables -------------------------------------------------------------

def test_bypass_is_identity_through_stage2(ram, make) -> None:
    eng = make(ram.mem)
    eng.set_stream_bypass(SID)
    assert ok(eng.translate(SID, -1, RAM_PAGE + 0x123, 4, READ)) == RAM_PAGE + 0x123
    rec = fault(eng.translate(SID, -1, 0x1000, 4, WRITE))  # not guest RAM: stage 2 has nothing
    assert (rec.event_id, rec.s2, rec.event_class, rec.ipa) == \
        (EventId.F_TRANSLATION, True, EventClass.IN, 0x1000)
    rec = fault(eng.translate(SID, -1, 1 << 48, 4, READ))  # beyond the IAS
    assert (rec.event_id, rec.s2) == (EventId.F_ADDR_SIZE, False)


def test_unknown_stream_is_c_bad_streamid_with_the_ssid(ram, make) -> None:
    rec = fault(make(ram.mem).translate(7, 5, 0x1000, 4, READ))
    assert (rec.event_id, rec.sid, rec.ssv, rec.ssid) == (EventId.C_BAD_STREAMID, 7, True, 5)


def test_blocked_stream_is_stream_disabled_with_the_sid_only(ram, make) -> None:
    eng = make(ram.mem)
    eng.set_stream_blocked(SID)
    rec = fault(eng.translate(SID, 3, RAM_PAGE, 4, READ))
    assert (rec.event_id, rec.sid, rec.ssv, rec.ssid, rec.address) == \
        (EventId.F_STREAM_DISABLED, SID, False, 0, 0)


def test_clear_stream_forgets_it(ram, make) -> None:
    eng = make(ram.mem)
    eng.set_stream_bypass(SID)
    assert eng.clear_stream(SID) and not eng.clear_stream(SID)
    assert fault(eng.translate(SID, -1, RAM_PAGE, 4, READ)).event_id == EventId.C_BAD_STREAMID


def map_stream(ram: GuestRam, make, *mappings: Mapping, asid: int = 1):
    eng, table = make(ram.mem), MappingTable()
    for m in mappings:
        table.add(m)
    eng.set_stream_map(SID, table, asid)
    return eng, table


def test_map_mode_translates_and_faults_with_class_in(ram, make) -> None:
    eng, _ = map_stream(ram, make, Mapping(0x10000, 0x1FFFF, RAM_PAGE, RW),
                        Mapping(0x20000, 0x20FFF, RAM_PAGE, int(MapFlag.READ)))
    assert ok(eng.translate(SID, -1, 0x10010, 8, WRITE)) == RAM_PAGE + 0x10
    rec = fault(eng.translate(SID, -1, 0x30000, 8, READ))
    assert (rec.event_id, rec.s2, rec.event_class, rec.address, rec.rnw) == \
        (EventId.F_TRANSLATION, False, EventClass.IN, 0x30000, True)
    rec = fault(eng.translate(SID, -1, 0x20008, 8, WRITE))
    assert (rec.event_id, rec.rnw, rec.s2) == (EventId.F_PERMISSION, False, False)
    assert ok(eng.translate(SID, -1, 0x20008, 8, READ | EXEC)) == RAM_PAGE + 8


def test_map_mode_output_beyond_the_oas_is_address_size(ram, make) -> None:
    eng, _ = map_stream(ram, make, Mapping(0x0, 0xFFF, 1 << 48, RW))
    assert fault(eng.translate(SID, -1, 0x10, 4, READ)).event_id == EventId.F_ADDR_SIZE


def test_map_mode_has_no_substreams(ram, make) -> None:
    eng, _ = map_stream(ram, make, Mapping(0x0, 0xFFF, RAM_PAGE, RW))
    rec = fault(eng.translate(SID, 1, 0x10, 4, READ))
    assert (rec.event_id, rec.ssv, rec.ssid) == (EventId.C_BAD_SUBSTREAMID, True, 1)


def test_unmap_drops_cached_translations_by_itself(ram, make) -> None:
    eng, table = map_stream(ram, make, Mapping(0x10000, 0x10FFF, RAM_PAGE, RW))
    ok(eng.translate(SID, -1, 0x10000, 4, READ))
    ok(eng.translate(SID, -1, 0x10000, 4, READ))
    table.remove_range(0x10000, 0x10FFF)
    assert fault(eng.translate(SID, -1, 0x10000, 4, READ)).event_id == EventId.F_TRANSLATION


def test_a_mapping_ending_inside_a_page_stops_dma_there(ram, make) -> None:
    eng, _ = map_stream(ram, make, Mapping(0x10000, 0x107FF, RAM_PAGE, RW))
    ram.write(RAM_PAGE, bytes(range(256)) * 8)
    assert eng.dma_read(SID, -1, 0x107F0, 16)[0] == ram.read(RAM_PAGE + 0x7F0, 16)
    data, record = eng.dma_read(SID, -1, 0x107F0, 17)
    assert data is None and EventRecord.decode(record).address == 0x10800


def test_dma_crosses_pages_and_reports_the_first_fault(ram, make) -> None:
    eng, _ = map_stream(ram, make, Mapping(0x10000, 0x11FFF, RAM_PAGE + 2 * PAGE, RW))
    assert eng.dma_write(SID, -1, 0x10FFE, b"wxyz") == (4, None)
    assert ram.read(RAM_PAGE + 3 * PAGE - 2, 4) == b"wxyz"
    assert eng.dma_read(SID, -1, 0x10FFE, 4) == (b"wxyz", None)
    written, record = eng.dma_write(SID, -1, 0x11FFE, b"abcd")
    assert written is None and EventRecord.decode(record).address == 0x12000
    assert ram.read(RAM_PAGE + 4 * PAGE - 2, 2) == b"ab"  # the first page went out


def test_bad_arguments_say_what_to_pass(ram) -> None:
    eng = Engine(ram.mem)
    with pytest.raises(ValueError, match="READ, WRITE or EXEC"):
        eng.translate(SID, -1, 0, 4, PRIV)
    with pytest.raises(ValueError, match="ssid"):
        eng.translate(SID, 1 << 20, 0, 4, READ)
    with pytest.raises(ValueError, match="power of two"):
        Engine(ram.mem, iotlb_size=3)
    with pytest.raises(ValueError, match="EXEC/PRIV"):
        eng.dma_read(SID, -1, 0, 4, flags=WRITE)


# --- AArch64 stage 1 -------------------------------------------------------------------------

@pytest.mark.parametrize("granule, va_bits", [
    (4096, 48), (4096, 39), (4096, 25), (16384, 48), (16384, 47), (16384, 36),
    (65536, 48), (65536, 42), (65536, 29)])
def test_each_granule_and_input_size_walks_to_a_page(ram, make, granule, va_bits) -> None:
    eng = make(ram.mem)
    tables = table_stream(ram, eng, SID, granule=granule, va_bits=va_bits)
    va = 0x5555_5555_5555_5555 & ((1 << va_bits) - granule)  # every level's index non-zero
    oa = RAM_PAGE & ~(granule - 1)
    tables.map(va, oa)
    assert ok(eng.translate(SID, -1, va + 0xABC, 4, READ)) == oa + 0xABC
    rec = fault(eng.translate(SID, -1, va ^ granule, 4, READ))
    assert (rec.event_id, rec.event_class, rec.s2) == (EventId.F_TRANSLATION, EventClass.IN, False)
    rec = fault(eng.translate(SID, -1, 1 << va_bits, 4, READ))  # above TTB0's range
    assert rec.event_id == EventId.F_TRANSLATION


@pytest.mark.parametrize("granule, level, block", [
    (4096, 1, 1 << 30), (4096, 2, 1 << 21), (16384, 2, 1 << 25), (65536, 2, 1 << 29)])
def test_block_mappings(ram, make, granule, level, block) -> None:
    eng = make(ram.mem)
    tables = table_stream(ram, eng, SID, granule=granule)
    va = 7 * block
    tables.map(va, GPA_BASE & ~(block - 1), level=level)
    offset = RAM_PAGE - (GPA_BASE & ~(block - 1)) + 0x44
    assert ok(eng.translate(SID, -1, va + offset, 4, WRITE)) == RAM_PAGE + 0x44


@pytest.mark.parametrize("granule, level", [(4096, 0), (16384, 1), (65536, 1)])
def test_blocks_where_the_granule_has_none_are_translation_faults(ram, make, granule,
                                                                  level) -> None:
    eng = make(ram.mem)
    tables = table_stream(ram, eng, SID, granule=granule)
    tables.map(0, 0, level=level)
    assert fault(eng.translate(SID, -1, 0x40, 4, READ)).event_id == EventId.F_TRANSLATION


def test_a_level3_descriptor_with_type_0_is_reserved(ram, make) -> None:
    eng = make(ram.mem)
    tables = table_stream(ram, eng, SID)
    slot = tables.map(0x5000, RAM_PAGE)
    ram.write64(slot, ram.read64(slot) & ~2)
    assert fault(eng.translate(SID, -1, 0x5000, 4, READ)).event_id == EventId.F_TRANSLATION


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_an_invalid_descriptor_at_any_level_is_a_translation_fault(ram, make, level) -> None:
    eng = make(ram.mem)
    tables = table_stream(ram, eng, SID)
    tables.map(0x7000, RAM_PAGE)
    slot = tables.descriptor_gpa(0x7000, level)
    ram.write64(slot, ram.read64(slot) & ~1)
    rec = fault(eng.translate(SID, -1, 0x7000, 4, READ | PRIV))
    assert (rec.event_id, rec.event_class, rec.pnu, rec.address) == \
        (EventId.F_TRANSLATION, EventClass.IN, True, 0x7000)


def two_range_stream(ram, make, *, tbi: bool = False):
    """TTB0 and TTB1 both enabled, 39-bit ranges, different tables."""
    eng = make(ram.mem)
    low, high = Stage1Tables(ram, 4096, 39), Stage1Tables(ram, 4096, 39)
    cd_gpa = ram.alloc(64, 64)
    ram.write(cd_gpa, cd(ttb0=low.root, ttb1=high.root, t0sz=25, t1sz=25, epd1=False,
                         tbi0=tbi, tbi1=tbi))
    eng.set_stream_table(SID, *ste(cd_gpa))
    low.map(0x1000, RAM_PAGE)
    high.map(0xFFFF_FF80_0000_1000 & ((1 << 39) - 1), RAM_PAGE + PAGE)
    return eng


def test_ttb1_translates_the_top_of_the_address_space(ram, make) -> None:
    eng = two_range_stream(ram, make)
    assert ok(eng.translate(SID, -1, 0x1008, 4, READ)) == RAM_PAGE + 8
    assert ok(eng.translate(SID, -1, 0xFFFF_FF80_0000_1008, 4, READ)) == RAM_PAGE + PAGE + 8
    for gap in (1 << 39, 0xFFFF_FF00_0000_0000, 0x00FF_0000_0000_1000):
        assert fault(eng.translate(SID, -1, gap, 4, READ)).event_id == EventId.F_TRANSLATION


def test_tbi_ignores_the_top_byte(ram, make) -> None:
    eng = two_range_stream(ram, make, tbi=True)
    assert ok(eng.translate(SID, -1, 0x5A00_0000_0000_1008, 4, READ)) == RAM_PAGE + 8
    assert ok(eng.translate(SID, -1, 0x12FF_FF80_0000_1008, 4, READ)) == RAM_PAGE + PAGE + 8


def test_a_disabled_ttb_half_is_a_translation_fault(ram, make) -> None:
    eng = make(ram.mem)
    table_stream(ram, eng, SID, epd0=True).map(0x1000, RAM_PAGE)
    assert fault(eng.translate(SID, -1, 0x1000, 4, READ)).event_id == EventId.F_TRANSLATION


def test_read_only_page_faults_writes_with_rnw_clear(ram, make) -> None:
    eng = make(ram.mem)
    table_stream(ram, eng, SID).map(0x2000, RAM_PAGE, ap_ro=True)
    assert ok(eng.translate(SID, -1, 0x2000, 4, READ)) == RAM_PAGE
    rec = fault(eng.translate(SID, -1, 0x2010, 4, WRITE))
    assert (rec.event_id, rec.rnw, rec.ind, rec.s2, rec.event_class, rec.address) == \
        (EventId.F_PERMISSION, False, False, False, EventClass.IN, 0x2010)


def test_privileged_only_page(ram, make) -> None:
    eng = make(ram.mem)
    table_stream(ram, eng, SID).map(0x2000, RAM_PAGE, ap_el0=False)
    rec = fault(eng.translate(SID, -1, 0x2000, 4, READ))
    assert (rec.event_id, rec.pnu) == (EventId.F_PERMISSION, False)
    assert ok(eng.translate(SID, -1, 0x2000, 4, READ | WRITE | PRIV)) == RAM_PAGE


def test_execute_never(ram, make) -> None:
    eng = make(ram.mem)
    tables = table_stream(ram, eng, SID)
    tables.map(0x1000, RAM_PAGE, uxn=True, ap_ro=True)
    tables.map(0x2000, RAM_PAGE, pxn=True, ap_ro=True)
    tables.map(0x3000, RAM_PAGE)  # writable at EL0: never privileged-executable
    rec = fault(eng.translate(SID, -1, 0x1000, 4, EXEC))
    assert (rec.event_id, rec.ind, rec.rnw, rec.pnu) == (EventId.F_PERMISSION, True, True, False)
    assert ok(eng.translate(SID, -1, 0x1000, 4, EXEC | PRIV)) == RAM_PAGE
    assert ok(eng.translate(SID, -1, 0x1000, 4, READ)) == RAM_PAGE
    assert ok(eng.translate(SID, -1, 0x2000, 4, EXEC)) == RAM_PAGE
    rec = fault(eng.translate(SID, -1, 0x2000, 4, EXEC | PRIV))
    assert (rec.ind, rec.pnu) == (True, True)
    assert fault(eng.translate(SID, -1, 0x3000, 4, EXEC | PRIV)).event_id == EventId.F_PERMISSION
    assert ok(eng.translate(SID, -1, 0x3000, 4, EXEC)) == RAM_PAGE
    rec = fault(eng.translate(SID, -1, 0x2000, 4, WRITE | EXEC | PRIV))  # a write is data
    assert (rec.ind, rec.rnw) == (False, False)


def test_hierarchical_table_attributes_unless_disabled(ram, make) -> None:
    for had, expect_fault in ((False, True), (True, False)):
        eng = make(ram.mem)
        tables = table_stream(ram, eng, SID, had0=had)
        tables.map(0x1000, RAM_PAGE, table_bits=1 << hw.DESC_APTABLE1)  # no writes below
        result = eng.translate(SID, -1, 0x1000, 4, WRITE)
        assert (result[0] is None) == expect_fault
        tables = table_stream(ram, eng, SID + 1, had0=had)
        tables.map(0x1000, RAM_PAGE, table_bits=1 << hw.DESC_UXNTABLE)
        assert (eng.translate(SID + 1, -1, 0x1000, 4, EXEC)[0] is None) == expect_fault


def test_access_flag_clear_is_an_access_fault_unless_affd(ram, make) -> None:
    eng = make(ram.mem)
    table_stream(ram, eng, SID).map(0x1000, RAM_PAGE, af=False)
    rec = fault(eng.translate(SID, -1, 0x1000, 4, READ))
    assert (rec.event_id, rec.event_class, rec.s2) == (EventId.F_ACCESS, EventClass.IN, False)
    table_stream(ram, eng, SID, affd=True).map(0x1000, RAM_PAGE, af=False)
    assert ok(eng.translate(SID, -1, 0x1000, 4, READ)) == RAM_PAGE


def test_output_beyond_ips_is_address_size(ram, make) -> None:
    eng = make(ram.mem)
    tables = table_stream(ram, eng, SID, ips=0)          # 32-bit IPA
    tables.map(0x1000, 1 << 33)
    assert fault(eng.translate(SID, -1, 0x1000, 4, READ)).event_id == EventId.F_ADDR_SIZE
    tables.map(0x20_0000, 1 << 40, level=2)             # a block beyond, one level up
    assert fault(eng.translate(SID, -1, 0x20_0000, 4, READ)).event_id == EventId.F_ADDR_SIZE


def test_a_next_table_beyond_ips_is_address_size(ram, make) -> None:
    eng = make(ram.mem)
    tables = table_stream(ram, eng, SID, ips=0)
    tables.map(0x1000, RAM_PAGE)
    slot = tables.descriptor_gpa(0x1000, 1)
    ram.write64(slot, ram.read64(slot) | 1 << 36)
    assert fault(eng.translate(SID, -1, 0x1000, 4, READ)).event_id == EventId.F_ADDR_SIZE


def test_a_table_outside_guest_ram_is_a_walk_abort(ram, make) -> None:
    eng = make(ram.mem)
    tables = table_stream(ram, eng, SID)
    tables.map(0x1000, RAM_PAGE)
    slot = tables.descriptor_gpa(0x1000, 2)
    ram.write64(slot, 0x8000_0000 | 3)  # a level-3 table at 2 GiB: no RAM there
    rec = fault(eng.translate(SID, -1, 0x1008, 4, WRITE))
    assert (rec.event_id, rec.event_class, rec.s2, rec.ttrnw, rec.address, rec.rnw) == \
        (EventId.F_WALK_EABT, EventClass.TT, False, True, 0x1008, False)
    # FetchAddr (DW3): the descriptor the walk could not read
    assert rec.fetch_addr == 0x8000_0008 and rec.ipa == 0


def test_record_bit_clear_terminates_stage1_faults_without_an_event(ram, make) -> None:
    eng = make(ram.mem)
    table_stream(ram, eng, SID, record=False).map(0x1000, RAM_PAGE, ap_ro=True)
    assert eng.translate(SID, -1, 0x5000, 4, READ) == (None, None)
    assert eng.translate(SID, -1, 0x1000, 4, WRITE) == (None, None)
    assert eng.dma_write(SID, -1, 0x1000, b"x") == (None, None)
    assert ok(eng.translate(SID, -1, 0x1000, 4, READ)) == RAM_PAGE


# --- STE and CD tables -------------------------------------------------------------------------

def cd_table(ram: GuestRam, n: int, base_va: int = 0x1000) -> tuple[int, list[int]]:
    """A linear table of n CDs; CD i maps base_va to its own RAM page."""
    table = ram.alloc(64 * n, 64 * n)
    pages = []
    for i in range(n):
        tables = Stage1Tables(ram)
        page = ram.alloc(PAGE)
        tables.map(base_va, page)
        ram.write(table + 64 * i, cd(ttb0=tables.root, asid=i))
        pages.append(page)
    return table, pages


def test_linear_cd_table_selects_the_cd_by_ssid(ram, make) -> None:
    eng = make(ram.mem)
    table, pages = cd_table(ram, 4)
    eng.set_stream_table(SID, *ste(table, s1cdmax=2, s1dss=hw.STRTAB_STE_1_S1DSS_SSID0))
    for ssid in (1, 2, 3):
        assert ok(eng.translate(SID, ssid, 0x1000, 4, READ)) == pages[ssid]
    assert ok(eng.translate(SID, -1, 0x1000, 4, READ)) == pages[0]   # S1DSS: CD 0
    for bad in (0, 4):                                             # SSID 0 is reserved there
        rec = fault(eng.translate(SID, bad, 0x1000, 4, READ))
        assert (rec.event_id, rec.ssid, rec.ssv) == (EventId.C_BAD_SUBSTREAMID, bad, True)
        eng.set_stream_table(SID, *ste(table, s1cdmax=2, s1dss=hw.STRTAB_STE_1_S1DSS_SSID0))


@pytest.mark.parametrize("s1fmt, ssid", [(hw.STRTAB_STE_0_S1FMT_4K_L2, 70),
                                         (hw.STRTAB_STE_0_S1FMT_64K_L2, 1500)])
def test_two_level_cd_tables(ram, make, s1fmt, ssid) -> None:
    eng = make(ram.mem)
    split = hw.CTXDESC_SPLIT_4K if s1fmt == hw.STRTAB_STE_0_S1FMT_4K_L2 else hw.CTXDESC_SPLIT_64K
    l1 = ram.alloc(512, 512)
    leaf = ram.alloc(64 << split, PAGE)
    tables, page = Stage1Tables(ram), ram.alloc(PAGE)
    tables.map(0x1000, page)
    ram.write(leaf + 64 * (ssid % (1 << split)), cd(ttb0=tables.root))
    ram.write64(l1 + 8 * (ssid >> split), l1cd(leaf))
    eng.set_stream_table(SID, *ste(l1, s1cdmax=12, s1fmt=s1fmt))
    assert ok(eng.translate(SID, ssid, 0x1000, 4, READ)) == page
    rec = fault(eng.translate(SID, ssid + (1 << split), 0x1000, 4, READ))  # L1CD.V = 0
    assert (rec.event_id, rec.ssid) == (EventId.C_BAD_SUBSTREAMID, ssid + (1 << split))


def test_s1dss_decides_for_transactions_without_ssid(ram, make) -> None:
    table, pages = cd_table(ram, 2)
    eng = make(ram.mem)
    eng.set_stream_table(SID, *ste(table, s1cdmax=1))               # TERMINATE
    rec = fault(eng.translate(SID, -1, 0x1000, 4, READ))
    assert (rec.event_id, rec.ssv) == (EventId.F_STREAM_DISABLED, False)
    assert ok(eng.translate(SID, 1, 0x1000, 4, READ)) == pages[1]
    assert ok(eng.translate(SID, 0, 0x1000, 4, READ)) == pages[0]   # SSID 0 usable here
    eng.set_stream_table(SID, *ste(table, s1cdmax=1, s1dss=hw.STRTAB_STE_1_S1DSS_BYPASS))
    assert ok(eng.translate(SID, -1, RAM_PAGE, 4, READ)) == RAM_PAGE


def test_substreams_disabled_by_s1cdmax_0(ram, make) -> None:
    eng = make(ram.mem)
    table_stream(ram, eng, SID).map(0x1000, RAM_PAGE)
    rec = fault(eng.translate(SID, 1, 0x1000, 4, READ))
    assert (rec.event_id, rec.ssid) == (EventId.C_BAD_SUBSTREAMID, 1)


def test_cd_outside_guest_ram_is_a_cd_fetch_fault(ram, make) -> None:
    eng = make(ram.mem)
    eng.set_stream_table(SID, *ste(0x8000_0040, s1cdmax=3))
    rec = fault(eng.translate(SID, 2, 0x1000, 4, READ))
    assert (rec.event_id, rec.ssv, rec.ssid, rec.fetch_addr) == \
        (EventId.F_CD_FETCH, True, 2, 0x8000_0040 + 2 * 64)


@pytest.mark.parametrize("words", [
    dict(valid=False),
    dict(config=1), dict(config=2), dict(config=3),
    dict(config=hw.STRTAB_STE_0_CFG_S2_TRANS), dict(config=hw.STRTAB_STE_0_CFG_NESTED),
    dict(s1cdmax=2, s1fmt=3), dict(s1cdmax=2, s1dss=3), dict(s1cdmax=21), dict(s1stalld=True),
], ids=repr)
def test_bad_ste(ram, make, words) -> None:
    eng = make(ram.mem)
    table, _ = cd_table(ram, 4)
    eng.set_stream_table(SID, *ste(table, **words))
    rec = fault(eng.translate(SID, -1, 0x1000, 4, READ))
    assert (rec.event_id, rec.sid) == (EventId.C_BAD_STE, SID)


def test_ste_abort_terminates_silently_and_bypass_skips_stage1(ram, make) -> None:
    eng = make(ram.mem)
    eng.set_stream_table(SID, *ste(0, config=hw.STRTAB_STE_0_CFG_ABORT))
    assert eng.translate(SID, -1, RAM_PAGE, 4, READ) == (None, None)
    eng.set_stream_table(SID, *ste(0, config=hw.STRTAB_STE_0_CFG_BYPASS))
    assert ok(eng.translate(SID, -1, RAM_PAGE, 4, READ)) == RAM_PAGE
    assert fault(eng.translate(SID, 1, RAM_PAGE, 4, READ)).event_id == EventId.C_BAD_SUBSTREAMID


@pytest.mark.parametrize("fields", [
    dict(valid=False), dict(aa64=False), dict(t0sz=15), dict(t0sz=40), dict(tg0=3),
    dict(epd1=False, tg1=0), dict(ips=0, ttb0=1 << 32), dict(endi=True), dict(abort=False),
    dict(stall=True), dict(ha=True), dict(hd=True),
], ids=repr)
def test_bad_cd(ram, make, fields) -> None:
    eng = make(ram.mem)
    tables = Stage1Tables(ram)
    tables.map(0x1000, RAM_PAGE)
    cd_gpa = ram.alloc(64, 64)
    ram.write(cd_gpa, cd(**{"ttb0": tables.root, **fields}))
    eng.set_stream_table(SID, *ste(cd_gpa))
    rec = fault(eng.translate(SID, -1, 0x1000, 4, READ))
    assert (rec.event_id, rec.ssv) == (EventId.C_BAD_CD, False)


def test_a_disabled_half_is_not_checked(ram, make) -> None:
    eng = make(ram.mem)
    table_stream(ram, eng, SID, epd1=True, t1sz=0, tg1=0).map(0x1000, RAM_PAGE)
    assert ok(eng.translate(SID, -1, 0x1000, 4, READ)) == RAM_PAGE


@pytest.mark.parametrize("breakage", ["ste", "cd", "substream"])
def test_config_faults_are_sticky_until_the_stream_is_reprogrammed(ram, make, breakage) -> None:
    eng = make(ram.mem)
    table, pages = cd_table(ram, 4)
    good = ste(table, s1cdmax=2)
    eng.set_stream_table(SID, *good)
    ok(eng.translate(SID, 1, 0x1000, 4, READ))
    if breakage == "ste":
        eng.set_stream_table(SID, *ste(table, s1cdmax=2, valid=False))
        first = eng.translate(SID, 1, 0x1000, 4, READ)
    elif breakage == "cd":
        saved = ram.read(table + 64 * 3, 64)
        ram.write(table + 64 * 3, cd(valid=False))
        first = eng.translate(SID, 3, 0x1000, 4, READ)
        ram.write(table + 64 * 3, saved)           # the guest fixes it and invalidates
        eng.invalidate_all()
    else:
        first = eng.translate(SID, 9, 0x1000, 4, READ)
    rec = fault(first)
    expected = {"ste": (EventId.C_BAD_STE, 1), "cd": (EventId.C_BAD_CD, 3),
                "substream": (EventId.C_BAD_SUBSTREAMID, 9)}[breakage]
    assert (rec.event_id, rec.ssid, rec.ssv) == (*expected, True)
    for ssid, iova in ((1, 0x1000), (2, 0x1000), (3, 0x9000)):
        assert eng.translate(SID, ssid, iova, 4, READ) == first
    eng.set_stream_table(SID, *good)
    assert ok(eng.translate(SID, 1, 0x1000, 4, READ)) == pages[1]


# --- stage 2 -------------------------------------------------------------------------------

def test_stage2_revoke_under_a_live_mapping(ram, make) -> None:
    eng = make(ram.mem)
    table_stream(ram, eng, SID).map(0x1000, RAM_PAGE)
    ok(eng.translate(SID, -1, 0x1004, 4, WRITE))
    ok(eng.translate(SID, -1, 0x1004, 4, WRITE))             # cached
    assert eng.s2_set_perm(RAM_PAGE, PAGE, False, False) == 1
    rec = fault(eng.translate(SID, -1, 0x1004, 4, READ))
    assert (rec.event_id, rec.s2, rec.ipa, rec.event_class, rec.address) == \
        (EventId.F_PERMISSION, True, RAM_PAGE, EventClass.IN, 0x1004)
    eng.s2_reset()
    assert ok(eng.translate(SID, -1, 0x1004, 4, WRITE)) == RAM_PAGE + 4


def test_stage2_read_only(ram, make) -> None:
    eng = make(ram.mem)
    eng.set_stream_bypass(SID)
    ok(eng.translate(SID, -1, RAM_PAGE, 4, WRITE))
    eng.s2_set_perm(RAM_PAGE + 5, 1, True, False)   # any byte in the page protects it
    assert eng.s2_perm(RAM_PAGE) == (True, False) and eng.s2_perm(0x1000) is None
    assert ok(eng.translate(SID, -1, RAM_PAGE, 4, READ)) == RAM_PAGE
    rec = fault(eng.translate(SID, -1, RAM_PAGE + 8, 4, WRITE))
    assert (rec.event_id, rec.s2, rec.rnw, rec.ipa) == (EventId.F_PERMISSION, True, False, RAM_PAGE)


def test_stage2_faults_during_cd_and_table_fetches(ram, make) -> None:
    eng = make(ram.mem)
    tables = table_stream(ram, eng, SID)
    tables.map(0x1000, RAM_PAGE)
    eng.s2_set_perm(tables.cd_gpa, 64, False, False)
    rec = fault(eng.translate(SID, -1, 0x1000, 4, WRITE))
    assert (rec.event_id, rec.s2, rec.event_class, rec.ipa, rec.address, rec.rnw) == \
        (EventId.F_PERMISSION, True, EventClass.CD, tables.cd_gpa & ~0xFFF, 0x1000, False)
    eng.s2_reset()
    level2_table = tables.descriptor_gpa(0x1000, 2) & ~0xFFF
    eng.s2_set_perm(level2_table, PAGE, False, True)  # write-only: a table read fails
    rec = fault(eng.translate(SID, -1, 0x1000, 4, READ))
    assert (rec.event_id, rec.s2, rec.event_class, rec.ipa, rec.ttrnw) == \
        (EventId.F_PERMISSION, True, EventClass.TT, level2_table, True)


def test_stage2_follows_a_new_memory_table(make) -> None:
    ram = GuestRam()
    eng = make(ram.mem)
    eng.set_stream_bypass(SID)
    ram.write(RAM_PAGE, b"old!")
    assert eng.dma_read(SID, -1, RAM_PAGE, 4) == (b"old!", None)
    new = bytearray(ram.size)
    new[RAM_PAGE - GPA_BASE:RAM_PAGE - GPA_BASE + 4] = b"new!"
    ram.mem.clear()
    ram.mem.add_region(GPA_BASE, ram.size, 0, new)
    assert eng.dma_read(SID, -1, RAM_PAGE, 4) == (b"new!", None)
    ram.mem.clear()
    assert fault(eng.translate(SID, -1, RAM_PAGE, 4, READ)).s2


# --- IOTLB ---------------------------------------------------------------------------------------

def cached_table_stream(ram: GuestRam, asid: int = 9) -> tuple[Engine, Stage1Tables]:
    eng = Engine(ram.mem)
    tables = table_stream(ram, eng, SID, asid=asid)
    slot = tables.map(0x1000, RAM_PAGE)
    assert ok(eng.translate(SID, -1, 0x1000, 4, READ)) == RAM_PAGE
    assert ok(eng.translate(SID, -1, 0x1000, 4, READ)) == RAM_PAGE
    assert eng.iotlb_hits == 1
    ram.write64(slot, ram.read64(slot) + PAGE)   # the guest remaps 0x1000 ...
    return eng, tables


@pytest.mark.parametrize("miss, hit", [
    (lambda e: e.invalidate_stream(SID + 1), lambda e: e.invalidate_stream(SID)),
    (lambda e: e.invalidate_asid(8), lambda e: e.invalidate_asid(9)),
    (lambda e: e.invalidate_range(SID, 0x2000, PAGE), lambda e: e.invalidate_range(SID, 0xFFF, 2)),
    (lambda e: e.invalidate_range(SID + 1, 0, 1 << 20), lambda e: e.invalidate_all()),
], ids=["stream", "asid", "range", "all"])
def test_each_invalidation_drops_the_stale_entry(ram, miss, hit) -> None:
    eng, _ = cached_table_stream(ram)
    miss(eng)
    # ... and until it invalidates the right thing the IOTLB may keep the old translation
    assert ok(eng.translate(SID, -1, 0x1000, 4, READ)) == RAM_PAGE
    hit(eng)
    assert ok(eng.translate(SID, -1, 0x1000, 4, READ)) == RAM_PAGE + PAGE


@pytest.mark.parametrize("change", [
    lambda e, t: e.s2_set_perm(0, 1, True, True),
    lambda e, t: e.s2_reset(),
    lambda e, t: e.set_stream_table(SID, *ste(t.cd_gpa)),
], ids=["s2_set_perm", "s2_reset", "set_stream_table"])
def test_stage2_and_stream_changes_invalidate(ram, change) -> None:
    eng, tables = cached_table_stream(ram)
    change(eng, tables)
    assert ok(eng.translate(SID, -1, 0x1000, 4, READ)) == RAM_PAGE + PAGE


def test_a_cached_entry_still_checks_the_access(ram) -> None:
    eng = Engine(ram.mem)
    table_stream(ram, eng, SID).map(0x1000, RAM_PAGE, ap_ro=True)
    ok(eng.translate(SID, -1, 0x1000, 4, READ))
    rec = fault(eng.translate(SID, -1, 0x1000, 4, WRITE))
    assert rec.event_id == EventId.F_PERMISSION and eng.iotlb_hits == 0


def test_iotlb_can_be_disabled(ram) -> None:
    eng = Engine(ram.mem, iotlb_size=0)
    eng.set_stream_bypass(SID)
    for _ in range(3):
        ok(eng.translate(SID, -1, RAM_PAGE, 4, READ))
    assert (eng.iotlb_hits, eng.iotlb_misses) == (0, 3)


def test_mapping_table_generation_counts_removals() -> None:
    table = MappingTable()
    table.add(Mapping(0, 0xFFF, 0, 3))
    assert table.generation == 0 and table.remove_range(0x1000, 0x1FFF) == []
    assert table.generation == 0
    assert table.remove_range(0, 0xFFF) == [Mapping(0, 0xFFF, 0, 3)] and table.generation == 1
    with pytest.raises(ValueError, match="ends before it starts"):
        table.add(Mapping(5, 4, 0, 0))


# --- the oracle, on random worlds --------------------------------------------------------------

ACCESSES = [READ, WRITE, READ | WRITE, EXEC, READ | PRIV, WRITE | PRIV, EXEC | PRIV,
            WRITE | EXEC]
MAP_SID, BYPASS_SID, TABLE_SID, MULTI_SID = 1, 2, 3, 4


@st.composite
def leaves(draw, granule: int, va_bits: int, ram: GuestRam):
    shift = granule.bit_length() - 1
    block_levels = {4096: [1, 2], 16384: [2], 65536: [2]}[granule]
    level = draw(st.sampled_from([3, 3, 3] + block_levels + [0 if granule == 4096 else 1]))
    page = draw(st.integers(0, (1 << (va_bits - shift)) - 1))
    va = page << shift
    where = draw(st.sampled_from(["ram", "ram", "ram", "nowhere", "huge"]))
    oa = {"ram": ram.base + draw(st.integers(0, ram.size // PAGE - 1)) * PAGE,
          "nowhere": 0x8000_0000, "huge": 1 << draw(st.integers(33, 47))}[where]
    attrs = dict(ap_ro=draw(st.integers(0, 3)) == 0, ap_el0=draw(st.integers(0, 3)) > 0,
                 af=draw(st.integers(0, 5)) > 0, pxn=draw(st.booleans()),
                 uxn=draw(st.integers(0, 3)) == 0,
                 table_bits=draw(st.sampled_from([0, 0, 1 << 59, 1 << 60, 1 << 61, 1 << 62])))
    return va, oa, level, attrs


@st.composite
def worlds(draw):
    ram = GuestRam(8 << 20)
    granule = draw(st.sampled_from([4096, 16384, 65536]))
    va_bits = draw(st.sampled_from([25, 32, 39, 42, 48]))
    two_halves = draw(st.booleans())
    tables = [Stage1Tables(ram, granule, va_bits)]
    if two_halves:
        tables.append(Stage1Tables(ram, granule, va_bits))
    vas = []
    for half, t in enumerate(tables):
        for va, oa, level, attrs in draw(st.lists(leaves(granule, va_bits, ram), max_size=6)):
            t.map(va, oa, level=level, **attrs)
            vas.append(va if half == 0 else (-(1 << va_bits) + va) % (1 << 64))
    cd_fields = dict(granule=granule, t0sz=64 - va_bits, t1sz=64 - va_bits, epd1=not two_halves,
                     ttb0=tables[0].root, ttb1=tables[-1].root,
                     ips=draw(st.sampled_from([0, 2, 5, 5, 6])), affd=draw(st.booleans()),
                     record=draw(st.integers(0, 5)) > 0, tbi0=draw(st.booleans()),
                     tbi1=draw(st.booleans()), had0=draw(st.booleans()), asid=3,
                     valid=draw(st.integers(0, 19)) > 0)
    cd_page = ram.alloc(PAGE)
    for i in range(4):
        ram.write(cd_page + 64 * i, cd(**cd_fields))
    cdmax = draw(st.sampled_from([0, 0, 1, 2]))
    ste_words = ste(cd_page, s1cdmax=cdmax,
                    s1dss=draw(st.sampled_from([0, 1, 2, 2, 2])),
                    valid=draw(st.integers(0, 19)) > 0)
    maps = draw(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 4), st.integers(0, 2047),
                                   st.integers(0, 3)), max_size=5))
    overlay = draw(st.lists(st.tuples(st.integers(0, 2047), st.integers(1, 3), st.booleans(),
                                      st.booleans()), max_size=4))
    valid_ssids = list(range(1 << cdmax)) * 3 if cdmax else []
    ssids = [-1] * 12 + valid_ssids + [1 << cdmax]  # seldom one that latches C_BAD_SUBSTREAMID
    return dict(ram=ram, tables=tables, cd_page=cd_page, ste=ste_words, maps=maps,
                overlay=overlay, vas=vas, va_bits=va_bits, ssids=ssids)


def configure(eng, w: dict, table: MappingTable) -> None:
    eng.set_stream_map(MAP_SID, table, 1)
    eng.set_stream_bypass(BYPASS_SID)
    eng.set_stream_table(TABLE_SID, *w["ste"])
    eng.set_stream_table(MULTI_SID, *ste(w["cd_page"], s1cdmax=2))
    for page, npages, read, write in w["overlay"]:
        eng.s2_set_perm(GPA_BASE + page * PAGE, npages * PAGE, read, write)


SSIDS = {MAP_SID: [-1] * 19 + [1], BYPASS_SID: [-1] * 19 + [2],
         MULTI_SID: [-1, 0, 1, 2, 3] * 3 + [4]}


@st.composite
def requests(draw, w: dict):
    """Mostly plausible DMA: an SSID the stream may take, near something mapped."""
    sid = draw(st.sampled_from([MAP_SID] * 3 + [BYPASS_SID] * 2 + [TABLE_SID] * 8
                               + [MULTI_SID] * 4 + [9]))
    ssid = draw(st.sampled_from(w["ssids"] if sid == TABLE_SID else SSIDS.get(sid, [-1, 5])))
    if sid == MAP_SID:
        bases = [virt * PAGE for virt, *_ in w["maps"]] or [0]
    elif sid == BYPASS_SID:
        bases = [GPA_BASE + draw(st.integers(0, 2047)) * PAGE] * 5 + [1 << 48, 0]
    else:
        bases = w["vas"] or [0]
    base = draw(st.sampled_from(bases))
    offset = draw(st.one_of(st.integers(0, PAGE - 1), st.integers(0, 3 * PAGE)))
    top = draw(st.sampled_from([0, 0, 0, 0x5A << 56]))
    iova = (base + offset | top) % (1 << 64)
    return sid, ssid, iova, draw(st.sampled_from(ACCESSES))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(data=st.data())
def test_engine_always_answers_as_the_reference_does(data) -> None:
    w = data.draw(worlds())
    ram = w["ram"]
    table = MappingTable()
    for virt, npages, phys, flags in w["maps"]:
        try:
            table.add(Mapping(virt * PAGE, (virt + npages) * PAGE - 1, GPA_BASE + phys * PAGE,
                              flags))
        except ValueError:
            pass
    cached, uncached, ref = Engine(ram.mem, 64), Engine(ram.mem, 0), ReferenceEngine(ram.mem)
    for eng in (cached, uncached, ref):
        configure(eng, w, table)
    for _ in range(data.draw(st.integers(1, 30))):
        sid, ssid, iova, access = data.draw(requests(w))
        expected = ref.translate(sid, ssid, iova, 1, access)
        assert cached.translate(sid, ssid, iova, 1, access) == expected
        assert cached.translate(sid, ssid, iova, 1, access) == expected   # now from the IOTLB
        assert uncached.translate(sid, ssid, iova, 1, access) == expected
        n = data.draw(st.integers(1, 2 * PAGE))
        assert cached.dma_read(sid, ssid, iova, n) == ref.dma_read(sid, ssid, iova, n)
        if data.draw(st.integers(0, 4)) == 0:
            for eng in (cached, uncached, ref):    # reprogramming clears latched faults
                configure(eng, w, table)
        if data.draw(st.integers(0, 9)) == 0:
            # the guest flips a bit in its CD or tables, the host changes its overlay; then
            # both invalidate
            slot = data.draw(st.sampled_from([w["cd_page"], w["tables"][0].root]))
            slot += 8 * data.draw(st.integers(0, 3))
            ram.write64(slot, ram.read64(slot) ^ 1 << data.draw(st.integers(0, 63)))
            page, writable = data.draw(st.integers(0, 2047)), data.draw(st.booleans())
            for eng in (cached, uncached, ref):
                eng.s2_set_perm(GPA_BASE + page * PAGE, PAGE, True, writable)
                eng.invalidate_all()
