"""Builders for SMMUv3 structures in synthetic guest memory, for the translation tests.

GuestRam is a bytearray the data plane sees as guest RAM, with a bump allocator. `ste()` and
`cd()` encode stream table entry words and 64-byte context descriptors; Stage1Tables lays out
AArch64 stage-1 translation tables for one TTB. Field positions are the data plane's own
definitions (named as IHI 0070 and the Arm ARM name them); the targeted tests pin the
encodings to literal values from Linux's arm-smmu-v3.h.
"""

from __future__ import annotations

import struct

from viommu import _dataplane as hw
from viommu._dataplane import GuestMemory

GPA_BASE = 0x4000_0000          # 1 GiB aligned, so 4K level-1 blocks can land in RAM
UADDR_BASE = 0x7F00_0000_0000

GRANULE_TG0 = {4096: hw.CD_TG0_4K, 16384: hw.CD_TG0_16K, 65536: hw.CD_TG0_64K}
GRANULE_TG1 = {4096: hw.CD_TG1_4K, 16384: hw.CD_TG1_16K, 65536: hw.CD_TG1_64K}
IPS_FOR_BITS = {32: 0, 36: 1, 40: 2, 42: 3, 44: 4, 48: 5}


def put(value: int, msb: int, lsb: int) -> int:
    """value placed in bits [msb:lsb]."""
    assert 0 <= value < 1 << (msb - lsb + 1), (value, msb, lsb)
    return value << lsb


def flag(on: bool, bit: int) -> int:
    return int(on) << bit


class GuestRam:
    def __init__(self, size: int = 4 << 20, base: int = GPA_BASE) -> None:
        self.buf = bytearray(size)
        self.mem = GuestMemory()
        self.mem.add_region(base, size, UADDR_BASE, self.buf)
        self.base, self.size = base, size
        self._next = base

    @property
    def end(self) -> int:
        return self.base + self.size

    def alloc(self, size: int, align: int = 4096) -> int:
        gpa = (self._next + align - 1) & -align
        if gpa + size > self.end:
            raise MemoryError(f"test guest RAM exhausted: {size:#x} bytes at {gpa:#x}")
        self._next = gpa + size
        return gpa

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.base
        self.buf[off:off + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        off = gpa - self.base
        return bytes(self.buf[off:off + size])

    def write64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))

    def read64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]


def ste(context_ptr: int, *, s1cdmax: int = 0, s1fmt: int = hw.STRTAB_STE_0_S1FMT_LINEAR,
        s1dss: int = hw.STRTAB_STE_1_S1DSS_TERMINATE,
        config: int = hw.STRTAB_STE_0_CFG_S1_TRANS, valid: bool = True,
        s1stalld: bool = False) -> tuple[int, int]:
    """STE dwords 0 and 1 for a stage-1 stream."""
    word0 = (flag(valid, hw.STE_0_V)
             | put(config, hw.STE_0_CONFIG_MSB, hw.STE_0_CONFIG_LSB)
             | put(s1fmt, hw.STE_0_S1FMT_MSB, hw.STE_0_S1FMT_LSB)
             | put(context_ptr >> hw.STE_0_S1CONTEXTPTR_LSB, hw.STE_0_S1CONTEXTPTR_MSB,
                   hw.STE_0_S1CONTEXTPTR_LSB)
             | put(s1cdmax, hw.STE_0_S1CDMAX_MSB, hw.STE_0_S1CDMAX_LSB))
    word1 = put(s1dss, hw.STE_1_S1DSS_MSB, hw.STE_1_S1DSS_LSB) | flag(s1stalld, hw.STE_1_S1STALLD)
    return word0, word1


def cd(*, ttb0: int = 0, ttb1: int = 0, t0sz: int = 16, t1sz: int = 16, granule: int = 4096,
       granule1: int | None = None, tg0: int | None = None, tg1: int | None = None,
       epd0: bool = False, epd1: bool = True, ips: int = 5, asid: int = 0,
       affd: bool = False, tbi0: bool = False, tbi1: bool = False, had0: bool = False,
       had1: bool = False, valid: bool = True, aa64: bool = True, record: bool = True,
       abort: bool = True, endi: bool = False, stall: bool = False, ha: bool = False,
       hd: bool = False) -> bytes:
    """A 64-byte context descriptor, as Linux's arm_smmu_make_s1_cd writes one (R, A, AA64
    set), with every field open to tests."""
    tg0 = GRANULE_TG0[granule] if tg0 is None else tg0
    tg1 = GRANULE_TG1[granule1 or granule] if tg1 is None else tg1
    word0 = (put(t0sz, hw.CD_0_T0SZ_MSB, hw.CD_0_T0SZ_LSB)
             | put(tg0, hw.CD_0_TG0_MSB, hw.CD_0_TG0_LSB) | flag(epd0, hw.CD_0_EPD0)
             | flag(endi, hw.CD_0_ENDI)
             | put(t1sz, hw.CD_0_T1SZ_MSB, hw.CD_0_T1SZ_LSB)
             | put(tg1, hw.CD_0_TG1_MSB, hw.CD_0_TG1_LSB) | flag(epd1, hw.CD_0_EPD1)
             | flag(valid, hw.CD_0_V)
             | put(ips, hw.CD_0_IPS_MSB, hw.CD_0_IPS_LSB) | flag(affd, hw.CD_0_AFFD)
             | flag(tbi0, hw.CD_0_TBI0) | flag(tbi1, hw.CD_0_TBI1)
             | flag(aa64, hw.CD_0_AA64) | flag(hd, hw.CD_0_HD) | flag(ha, hw.CD_0_HA)
             | flag(stall, hw.CD_0_S) | flag(record, hw.CD_0_R) | flag(abort, hw.CD_0_A)
             | put(asid, hw.CD_0_ASID_MSB, hw.CD_0_ASID_LSB))
    ttb_mask = (1 << (hw.CD_1_TTB_MSB + 1)) - (1 << hw.CD_1_TTB_LSB)
    word1 = (ttb0 & ttb_mask) | flag(had0, hw.CD_1_HAD0)
    word2 = (ttb1 & ttb_mask) | flag(had1, hw.CD_1_HAD0)
    return struct.pack("<8Q", word0, word1, word2, 0, 0, 0, 0, 0)


def l1cd(leaf_table: int, valid: bool = True) -> int:
    return leaf_table | flag(valid, hw.CTXDESC_L1_DESC_V)


class Stage1Tables:
    """AArch64 stage-1 tables for one TTB, built in guest RAM.

    `granule` is 4096, 16384 or 65536; `va_bits` = 64 - TxSZ. Leaves default to what Linux's
    io-pgtable writes for a read/write, unprivileged-accessible IOMMU mapping: AF set,
    AP[1] (EL0 access) set, AP[2] (read-only) clear.
    """

    def __init__(self, ram: GuestRam, granule: int = 4096, va_bits: int = 48) -> None:
        self.ram, self.granule, self.va_bits = ram, granule, va_bits
        self.shift = granule.bit_length() - 1
        self.stride = self.shift - 3
        levels = -(-(va_bits - self.shift) // self.stride)
        self.start_level = 4 - levels
        self.first_bits = va_bits - self.shift - self.stride * (levels - 1)
        self.root = ram.alloc(granule, granule)

    def level_shift(self, level: int) -> int:
        return self.shift + self.stride * (3 - level)

    def index(self, va: int, level: int) -> int:
        width = self.first_bits if level == self.start_level else self.stride
        return (va >> self.level_shift(level)) & ((1 << width) - 1)

    def descriptor_gpa(self, va: int, level: int) -> int:
        """Where the descriptor for `va` at `level` lives (the tables above must exist)."""
        table = self.root
        for lvl in range(self.start_level, level):
            desc = self.ram.read64(table + 8 * self.index(va, lvl))
            assert desc & 3 == 3, f"no table at level {lvl} for {va:#x}"
            table = desc & ((1 << 48) - self.granule)
        return table + 8 * self.index(va, level)

    def map(self, va: int, oa: int, *, level: int = 3, ap_ro: bool = False,
            ap_el0: bool = True, af: bool = True, pxn: bool = False, uxn: bool = False,
            table_bits: int = 0, raw_bits: int = 0) -> int:
        """Map the page or block holding `va` at `level` to `oa`; returns the descriptor's
        gpa. `table_bits` go into every table descriptor created on the way (APTable,
        XNTable, PXNTable); `raw_bits` are OR-ed into the leaf as they are."""
        table = self.root
        for lvl in range(self.start_level, level):
            slot = table + 8 * self.index(va, lvl)
            desc = self.ram.read64(slot)
            if desc & 3 != 3:
                nxt = self.ram.alloc(self.granule, self.granule)
                desc = nxt | 3 | table_bits
                self.ram.write64(slot, desc)
            table = desc & ((1 << 48) - self.granule)
        block_mask = (1 << self.level_shift(level)) - 1
        leaf = ((oa & ~block_mask) | (3 if level == 3 else 1)
                | flag(ap_el0, hw.DESC_AP1) | flag(ap_ro, hw.DESC_AP2) | flag(af, hw.DESC_AF)
                | flag(pxn, hw.DESC_PXN) | flag(uxn, hw.DESC_UXN) | raw_bits)
        slot = table + 8 * self.index(va, level)
        self.ram.write64(slot, leaf)
        return slot


def table_stream(ram: GuestRam, engine, sid: int, *, granule: int = 4096, va_bits: int = 48,
                 ste_kwargs: dict | None = None, **cd_kwargs) -> Stage1Tables:
    """A stream with one CD (S1CDMax = 0) whose TTB0 is a fresh Stage1Tables."""
    tables = Stage1Tables(ram, granule, va_bits)
    cd_gpa = ram.alloc(64, 64)
    ram.write(cd_gpa, cd(ttb0=tables.root, t0sz=64 - va_bits, granule=granule, **cd_kwargs))
    engine.set_stream_table(sid, *ste(cd_gpa, **(ste_kwargs or {})))
    tables.cd_gpa = cd_gpa
    return tables
