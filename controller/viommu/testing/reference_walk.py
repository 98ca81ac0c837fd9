"""The translation engine's oracle: the same API and results as `viommu._dataplane.Engine`,
written as plainly as possible, with no caching at all.

Every call walks everything again: the stream's mode, the STE, the CD table (through stage 2),
the AArch64 tables (each descriptor through stage 2), then stage 2 for the output address.
Faults are exceptions carrying the event record's fields. Structure bit positions come from
the data plane's single definition of them (named as IHI 0070 and the Arm ARM name them).

Model choices it shares with the engine (see ext/stage2.pxi and ext/stage1.pxi):
- Stage 2 maps the whole 4 KiB pages of guest RAM, readable and writable unless the overlay
  (`s2_set_perm`) says otherwise. A fetch of a CD, L1CD or table descriptor from an IPA that
  is not guest RAM aborts (F_CD_FETCH / F_WALK_EABT); an output IPA there is a stage-2
  F_TRANSLATION. A revoked or read-only page gives stage-2 F_PERMISSION.
- translate() covers the 4 KiB page of `iova` (less if a MAP mapping ends inside it).
- (None, None) means "terminated, no event": STE.Config = abort, or CD.R = 0.
"""

from __future__ import annotations

import struct
from typing import Protocol

from viommu import _dataplane as hw
from viommu.events.smmuv3 import (
    ADDRESS_EVENTS,
    CONFIG_EVENTS,
    FETCH_EVENTS,
    EventClass,
    EventId,
    EventRecord,
)
from viommu.uapi import MapFlag

READ, WRITE, EXEC, PRIV = hw.READ, hw.WRITE, hw.EXEC, hw.PRIV
PAGE = 1 << hw.S2_PAGE_SHIFT
IPA_LIMIT = 1 << hw.SMMU_OAS_BITS

Result = tuple[int | None, bytes | None]


# Input addresses are 64-bit quantities: arithmetic on them wraps.
ADDRESS_MASK = (1 << 64) - 1
FETCH_ADDR_MASK = ((1 << 52) - 1) & ~0x7

class MappingLookup(Protocol):
    def lookup(self, iova: int): ...


def bits(value: int, msb: int, lsb: int) -> int:
    """Bits [msb:lsb] of value, shifted down."""
    return (value >> lsb) & ((1 << (msb - lsb + 1)) - 1)


def bit(value: int, n: int) -> bool:
    return bool(value >> n & 1)


class Fault(Exception):
    """A translation stopped; the fields are the event record's."""

    def __init__(self, event: EventId, *, recorded: bool = True, s2: bool = False,
                 event_class: EventClass = EventClass.IN, ipa: int = 0,
                 fetch_addr: int = 0) -> None:
        super().__init__(event.name)
        self.event, self.recorded, self.s2 = event, recorded, s2
        self.event_class, self.ipa, self.fetch_addr = event_class, ipa, fetch_addr


class Terminated(Fault):
    """Aborted without an event."""

    def __init__(self) -> None:
        super().__init__(EventId.F_TRANSLATION, recorded=False)


class ReferenceEngine:
    """Same methods as viommu._dataplane.Engine; `iotlb_size` is accepted and ignored."""

    def __init__(self, mem: hw.GuestMemory, iotlb_size: int = 0) -> None:
        self.mem = mem
        self.streams: dict[int, tuple] = {}
        self.sticky: dict[int, bytes] = {}
        self.overlay: list[tuple[int, int, bool, bool]] = []  # (first page, last page, r, w)

    # --- configuration -------------------------------------------------------------------

    def _set(self, sid: int, config: tuple) -> None:
        self.streams[sid] = config
        self.sticky.pop(sid, None)

    def set_stream_bypass(self, sid: int) -> None:
        self._set(sid, ("bypass",))

    def set_stream_blocked(self, sid: int) -> None:
        self._set(sid, ("blocked",))

    def set_stream_map(self, sid: int, table: MappingLookup, asid: int) -> None:
        self._set(sid, ("map", table))

    def set_stream_table(self, sid: int, ste0: int, ste1: int) -> None:
        self._set(sid, ("table", ste0, ste1))

    def clear_stream(self, sid: int) -> bool:
        self.sticky.pop(sid, None)
        return self.streams.pop(sid, None) is not None

    # Nothing is cached, so there is nothing to invalidate.
    def invalidate_all(self) -> None:
        pass

    def invalidate_stream(self, sid: int) -> None:
        pass

    def invalidate_asid(self, asid: int) -> None:
        pass

    def invalidate_range(self, sid: int, iova: int, size: int) -> None:
        pass

    def s2_set_perm(self, ipa: int, size: int, read: bool, write: bool) -> int:
        first, last = ipa // PAGE, (ipa + size - 1) // PAGE
        self.overlay.append((first, last, read, write))
        ram_pages = set()
        for gpa, length, _ in self.mem.regions_info:
            lo = max(first, -(-gpa // PAGE))
            hi = min(last, (gpa + length) // PAGE - 1, IPA_LIMIT // PAGE - 1)
            ram_pages.update(range(lo, hi + 1))
        return len(ram_pages)

    def s2_reset(self) -> None:
        self.overlay = []

    def s2_perm(self, ipa: int) -> tuple[bool, bool] | None:
        page = ipa // PAGE
        if ipa >= IPA_LIMIT or not self._page_in_ram(page):
            return None
        perm = (True, True)
        for first, last, read, write in self.overlay:  # later calls win
            if first <= page <= last:
                perm = (read, write)
        return perm

    def _page_in_ram(self, page: int) -> bool:
        start = page * PAGE
        return any(gpa <= start and start + PAGE <= gpa + size
                   for gpa, size, _ in self.mem.regions_info)

    # --- translation -----------------------------------------------------------------------

    def translate(self, sid: int, ssid: int, iova: int, size: int, access: int) -> Result:
        gpa, _ = self._translate(sid, ssid, iova, access)
        if gpa is None:
            return None, _
        return gpa, None

    def dma_read(self, sid: int, ssid: int, iova: int, n: int, flags: int = 0) -> Result:
        """Page by page; addresses are 64-bit, so a transfer past the top wraps to 0, as the
        engine's (and a device's) address arithmetic does."""
        data = b""
        while len(data) < n:
            gpa, info = self._translate(sid, ssid, (iova + len(data)) & ADDRESS_MASK,
                                        READ | flags)
            if gpa is None:
                return None, info
            data += self.mem.read(gpa, min(info, n - len(data)))
        return data, None

    def dma_write(self, sid: int, ssid: int, iova: int, data: bytes,
                  flags: int = 0) -> tuple[int | None, bytes | None]:
        done = 0
        while done < len(data):
            gpa, info = self._translate(sid, ssid, (iova + done) & ADDRESS_MASK, WRITE | flags)
            if gpa is None:
                return None, info
            chunk = min(info, len(data) - done)
            self.mem.write(gpa, data[done:done + chunk])
            done += chunk
        return len(data), None

    def _translate(self, sid: int, ssid: int, iova: int, access: int):
        """(gpa, bytes usable from gpa) or (None, record or None)."""
        try:
            return self._walk(sid, ssid, iova, access)
        except Fault as fault:
            if not fault.recorded:
                return None, None
            record = self._record(fault, sid, ssid, iova, access)
            if fault.event in CONFIG_EVENTS:
                self.sticky[sid] = record
            return None, record

    def _record(self, fault: Fault, sid: int, ssid: int, iova: int, access: int) -> bytes:
        fields: dict = {"event_id": fault.event, "sid": sid}
        if fault.event != EventId.F_STREAM_DISABLED and ssid >= 0:
            fields.update(ssv=True, ssid=ssid)
        if fault.event in FETCH_EVENTS:
            # The record's FetchAddr field is bits [51:3]: a fetch address past 52 bits (a CD
            # table at the top of the space) is reported truncated, as the engine does.
            fields["fetch_addr"] = fault.fetch_addr & FETCH_ADDR_MASK
        if fault.event in ADDRESS_EVENTS:
            fields.update(
                address=iova, rnw=not access & WRITE, pnu=bool(access & PRIV),
                ind=bool(access & EXEC and not access & WRITE), s2=fault.s2,
                event_class=fault.event_class, ttrnw=fault.event_class == EventClass.TT,
                ipa=fault.ipa if fault.s2 else 0)
        return EventRecord(**fields).encode()

    def _walk(self, sid: int, ssid: int, iova: int, access: int) -> tuple[int, int]:
        if sid not in self.streams:
            raise Fault(EventId.C_BAD_STREAMID)
        if sid in self.sticky:
            return None, self.sticky[sid]
        mode, *config = self.streams[sid]
        if mode == "blocked":
            raise Fault(EventId.F_STREAM_DISABLED)
        if ssid >= 0 and mode in ("bypass", "map"):
            raise Fault(EventId.C_BAD_SUBSTREAMID)
        if mode == "bypass":
            return self._bypass(iova, access)
        if mode == "map":
            return self._map(config[0], iova, access)
        return self._table(config[0], config[1], ssid, iova, access)

    # --- stage 1 ----------------------------------------------------------------------------

    def _bypass(self, iova: int, access: int) -> tuple[int, int]:
        if iova >= IPA_LIMIT:
            raise Fault(EventId.F_ADDR_SIZE)
        return self._output(iova, access, PAGE - iova % PAGE)

    def _map(self, table: MappingLookup, iova: int, access: int) -> tuple[int, int]:
        mapping = table.lookup(iova)
        if mapping is None:
            raise Fault(EventId.F_TRANSLATION)
        ipa = mapping.phys_start + (iova - mapping.virt_start)
        if ipa >= IPA_LIMIT:
            raise Fault(EventId.F_ADDR_SIZE)
        readable, writable = bool(mapping.flags & MapFlag.READ), bool(mapping.flags & MapFlag.WRITE)
        if not rw_permits(access, readable, writable):
            raise Fault(EventId.F_PERMISSION)
        usable = min(mapping.virt_end - iova + 1, PAGE - iova % PAGE)
        return self._output(ipa, access, usable)

    def _table(self, ste0: int, ste1: int, ssid: int, iova: int, access: int):
        if not bit(ste0, hw.STE_0_V):
            raise Fault(EventId.C_BAD_STE)
        config = bits(ste0, hw.STE_0_CONFIG_MSB, hw.STE_0_CONFIG_LSB)
        if config == hw.STRTAB_STE_0_CFG_ABORT:
            raise Terminated()
        if config == hw.STRTAB_STE_0_CFG_BYPASS:
            if ssid >= 0:
                raise Fault(EventId.C_BAD_SUBSTREAMID)
            return self._bypass(iova, access)
        if config != hw.STRTAB_STE_0_CFG_S1_TRANS:
            raise Fault(EventId.C_BAD_STE)
        cdmax = bits(ste0, hw.STE_0_S1CDMAX_MSB, hw.STE_0_S1CDMAX_LSB)
        s1fmt = bits(ste0, hw.STE_0_S1FMT_MSB, hw.STE_0_S1FMT_LSB)
        s1dss = bits(ste1, hw.STE_1_S1DSS_MSB, hw.STE_1_S1DSS_LSB)
        if bit(ste1, hw.STE_1_S1STALLD) or cdmax > hw.SMMU_SSIDSIZE:
            raise Fault(EventId.C_BAD_STE)
        if cdmax > 0 and (s1fmt > hw.STRTAB_STE_0_S1FMT_64K_L2
                          or s1dss > hw.STRTAB_STE_1_S1DSS_SSID0):
            raise Fault(EventId.C_BAD_STE)

        if ssid < 0:
            if cdmax > 0 and s1dss == hw.STRTAB_STE_1_S1DSS_TERMINATE:
                raise Fault(EventId.F_STREAM_DISABLED)
            if cdmax > 0 and s1dss == hw.STRTAB_STE_1_S1DSS_BYPASS:
                return self._bypass(iova, access)
            index = 0
        else:
            if cdmax == 0 or ssid >= 1 << cdmax:
                raise Fault(EventId.C_BAD_SUBSTREAMID)
            if ssid == 0 and s1dss == hw.STRTAB_STE_1_S1DSS_SSID0:
                raise Fault(EventId.C_BAD_SUBSTREAMID)
            index = ssid

        table = bits(ste0, hw.STE_0_S1CONTEXTPTR_MSB, hw.STE_0_S1CONTEXTPTR_LSB) \
            << hw.STE_0_S1CONTEXTPTR_LSB
        if cdmax == 0 or s1fmt == hw.STRTAB_STE_0_S1FMT_LINEAR:
            cd_addr = table + index * hw.CTXDESC_CD_SIZE
        else:
            split = hw.CTXDESC_SPLIT_4K if s1fmt == hw.STRTAB_STE_0_S1FMT_4K_L2 \
                else hw.CTXDESC_SPLIT_64K
            l1cd = self._fetch(table + (index >> split) * hw.CTXDESC_L1_DESC_SIZE,
                               EventClass.CD)
            if not bit(l1cd, hw.CTXDESC_L1_DESC_V):
                raise Fault(EventId.C_BAD_SUBSTREAMID)
            leaf_table = bits(l1cd, hw.CTXDESC_L1_DESC_L2PTR_MSB, hw.CTXDESC_L1_DESC_L2PTR_LSB) \
                << hw.CTXDESC_L1_DESC_L2PTR_LSB
            cd_addr = leaf_table + (index % (1 << split)) * hw.CTXDESC_CD_SIZE
        words = [self._fetch(cd_addr + 8 * i, EventClass.CD) for i in range(3)]
        cd = ContextDescriptor(*words)
        cd.check()
        return self._walk_aarch64(cd, iova, access)

    def _walk_aarch64(self, cd: ContextDescriptor, iova: int, access: int):
        record = cd.record
        half = 1 if bit(iova, 55) else 0
        if cd.epd[half]:
            raise Fault(EventId.F_TRANSLATION, recorded=record)
        va_bits = 64 - cd.tsz[half]
        top = 56 if cd.tbi[half] else 64
        upper = bits(iova, top - 1, va_bits)
        if upper != (0 if half == 0 else (1 << (top - va_bits)) - 1):
            raise Fault(EventId.F_TRANSLATION, recorded=record)

        granule = cd.granule[half]          # log2: 12, 14 or 16
        stride = granule - 3                # index bits per level
        levels = -(-(va_bits - granule) // stride)
        level = 4 - levels
        first_bits = va_bits - granule - stride * (levels - 1)
        table = cd.ttb[half] & ~((8 << first_bits) - 1)

        read_only = no_el0 = pxn = uxn = False  # hierarchical attributes (APTable, XNTable)
        while True:
            shift = granule + stride * (3 - level)
            width = first_bits if level == 4 - levels else stride
            index = bits(iova, shift + width - 1, shift)
            desc = self._fetch(table + 8 * index, EventClass.TT)
            if not bit(desc, hw.DESC_VALID):
                raise Fault(EventId.F_TRANSLATION, recorded=record)
            is_table_or_page = bit(desc, hw.DESC_TYPE)
            if level < 3 and is_table_or_page:
                table = bits(desc, hw.DESC_OA_MSB, granule) << granule
                if table >= 1 << cd.oas:
                    raise Fault(EventId.F_ADDR_SIZE, recorded=record)
                if not cd.had[half]:
                    read_only |= bit(desc, hw.DESC_APTABLE1)
                    no_el0 |= bit(desc, hw.DESC_APTABLE0)
                    pxn |= bit(desc, hw.DESC_PXNTABLE)
                    uxn |= bit(desc, hw.DESC_UXNTABLE)
                level += 1
                continue
            if level == 3 and not is_table_or_page:
                raise Fault(EventId.F_TRANSLATION, recorded=record)
            if level < 3 and not (level == 2 or (granule == 12 and level == 1)):
                raise Fault(EventId.F_TRANSLATION, recorded=record)
            out = bits(desc, hw.DESC_OA_MSB, shift) << shift
            if out >= 1 << cd.oas:
                raise Fault(EventId.F_ADDR_SIZE, recorded=record)
            if not bit(desc, hw.DESC_AF) and not cd.affd:
                raise Fault(EventId.F_ACCESS, recorded=record)
            ro = bit(desc, hw.DESC_AP2) or read_only
            el0 = bit(desc, hw.DESC_AP1) and not no_el0
            if not vmsa_permits(access, ro, el0, bit(desc, hw.DESC_PXN) or pxn,
                                bit(desc, hw.DESC_UXN) or uxn):
                raise Fault(EventId.F_PERMISSION, recorded=record)
            ipa = out + iova % (1 << shift)
            return self._output(ipa, access, PAGE - iova % PAGE)

    # --- stage 2 ----------------------------------------------------------------------------

    def _output(self, ipa: int, access: int, usable: int) -> tuple[int, int]:
        perm = self.s2_perm(ipa)
        if perm is None:
            raise Fault(EventId.F_TRANSLATION, s2=True, ipa=ipa)
        if not rw_permits(access, *perm):
            raise Fault(EventId.F_PERMISSION, s2=True, ipa=ipa)
        return ipa, min(usable, PAGE - ipa % PAGE)

    def _fetch(self, ipa: int, event_class: EventClass) -> int:
        """One 8-byte configuration or table read through stage 2."""
        perm = self.s2_perm(ipa)
        if perm is None:
            event = EventId.F_CD_FETCH if event_class == EventClass.CD else EventId.F_WALK_EABT
            raise Fault(event, event_class=event_class, fetch_addr=ipa)
        if not perm[0]:
            raise Fault(EventId.F_PERMISSION, s2=True, event_class=event_class, ipa=ipa)
        return struct.unpack("<Q", self.mem.read(ipa, 8))[0]


class ContextDescriptor:
    """The first three dwords of a CD, decoded."""

    def __init__(self, dword0: int, dword1: int, dword2: int) -> None:
        d = dword0
        self.dwords = (dword0, dword1, dword2)
        self.valid, self.aa64 = bit(d, hw.CD_0_V), bit(d, hw.CD_0_AA64)
        self.ips = bits(d, hw.CD_0_IPS_MSB, hw.CD_0_IPS_LSB)
        self.oas = min({0: 32, 1: 36, 2: 40, 3: 42, 4: 44}.get(self.ips, 48), hw.SMMU_OAS_BITS)
        self.affd, self.record = bit(d, hw.CD_0_AFFD), bit(d, hw.CD_0_R)
        self.tbi = (bit(d, hw.CD_0_TBI0), bit(d, hw.CD_0_TBI1))
        self.epd = (bit(d, hw.CD_0_EPD0), bit(d, hw.CD_0_EPD1))
        self.tsz = (bits(d, hw.CD_0_T0SZ_MSB, hw.CD_0_T0SZ_LSB),
                    bits(d, hw.CD_0_T1SZ_MSB, hw.CD_0_T1SZ_LSB))
        tg0 = bits(d, hw.CD_0_TG0_MSB, hw.CD_0_TG0_LSB)
        tg1 = bits(d, hw.CD_0_TG1_MSB, hw.CD_0_TG1_LSB)
        self.granule = ({hw.CD_TG0_4K: 12, hw.CD_TG0_16K: 14, hw.CD_TG0_64K: 16}.get(tg0),
                        {hw.CD_TG1_4K: 12, hw.CD_TG1_16K: 14, hw.CD_TG1_64K: 16}.get(tg1))
        self.ttb = tuple(bits(w, hw.CD_1_TTB_MSB, hw.CD_1_TTB_LSB) << hw.CD_1_TTB_LSB
                         for w in (dword1, dword2))
        self.had = (bit(dword1, hw.CD_1_HAD0), bit(dword2, hw.CD_1_HAD0))

    def check(self) -> None:
        """C_BAD_CD unless this SMMU can use the CD."""
        d = self.dwords[0]
        usable = (self.valid and self.aa64 and not bit(d, hw.CD_0_ENDI)
                  and bit(d, hw.CD_0_A) and not bit(d, hw.CD_0_S)
                  and not bit(d, hw.CD_0_HA) and not bit(d, hw.CD_0_HD))
        for half in (0, 1):
            if self.epd[half]:
                continue
            usable = usable and hw.CD_TSZ_MIN <= self.tsz[half] <= hw.CD_TSZ_MAX
            usable = usable and self.granule[half] is not None
            usable = usable and self.ttb[half] < 1 << self.oas
        if not usable:
            raise Fault(EventId.C_BAD_CD)


def rw_permits(access: int, readable: bool, writable: bool) -> bool:
    """MAP flags and stage-2 pages: reads and instruction fetches need read, writes write."""
    if access & WRITE and not writable:
        return False
    return not access & (READ | EXEC) or readable


def vmsa_permits(access: int, read_only: bool, el0: bool, pxn: bool, uxn: bool) -> bool:
    """AArch64 stage-1 permissions: AP[2] read-only, AP[1] unprivileged access, PXN/UXN."""
    privileged = bool(access & PRIV)
    if access & (READ | WRITE) and not (privileged or el0):
        return False
    if access & WRITE and read_only:
        return False
    if access & EXEC and not access & WRITE:
        if privileged and (pxn or (el0 and not read_only)):  # EL0-writable: never PXN-free
            return False
        if not privileged and uxn:
            return False
    return True
