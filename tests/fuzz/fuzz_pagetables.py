"""Fuzz the translation engine (ext/engine.pxi) against its oracle
(viommu.testing.reference_walk.ReferenceEngine).

The fuzzer builds guest structures in a small GuestMemory: STE words, CDs (every field, valid
or not), L1CD descriptors, and table memory (table, page, block, invalid and raw descriptors,
tables pointing at themselves or each other: cycles allowed), then runs a sequence of
operations on both engines: translate() and dma_read() for assorted streams, SubstreamIDs,
addresses (both TTB halves, tagged) and access kinds; reconfiguring streams (table, bypass,
blocked, MAP with a shared MappingTable, clear); host stage-2 changes; more memory writes
(followed by invalidate_all, which the architecture requires before the engine may see
them); targeted invalidations (engine only: they may drop cached translations, never change
a result); and, now and then, a new memory region.

Properties: the engine raises nothing but ValueError, and that only for arguments the API
rejects (ssid outside -1..2^20-1, an access that is not READ/WRITE/EXEC (+PRIV), size 0, a
stage-2 range that is empty or wraps); every result (address, event record byte for byte,
or silent termination), every dma_read, s2_set_perm count, s2_perm and clear_stream
equals the reference's.
"""

from __future__ import annotations

import struct

import atheris
import fuzzutil
from fuzzutil import check, interesting, pick

with fuzzutil.instrumented(__name__):
    from pagetables import Stage1Tables, cd, l1cd, ste
    from viommu import _dataplane as hw
    from viommu._dataplane import Engine, GuestMemory
    from viommu.device.mappings import Mapping, MappingTable, OverlapError, SplitError
    from viommu.events.smmuv3 import EventRecord
    from viommu.testing.reference_walk import ReferenceEngine

GPA = 0x4000_0000  # 1 GiB aligned
UADDR = 0x7F00_0000_0000
PAGES = 256  # 1 MiB: room for 64K-granule tables
MEM_SIZE = PAGES * 4096
SIDS = (1, 2, 7)
READ, WRITE, EXEC, PRIV = hw.READ, hw.WRITE, hw.EXEC, hw.PRIV
VALID_ACCESS = [a for a in range(16) if a & (READ | WRITE | EXEC)]
IOVAS = (0, 0x1000, 0x1234, 0x20_0000, 0x4000_0000, GPA, GPA + 0x3000, 1 << 39, 1 << 30,
         (1 << 48) - 0x1000, 1 << 48, 0xFFFF_0000_0000_0000, 0xFFFF_FFFF_FFFF_F000,
         0x00FF_0000_0000_1000, 0xAB00_0000_0000_2000, 1 << 55, (1 << 64) - 1)


# Bugs this harness found are fixed (tests/fuzz/regressions/fuzz_pagetables/); none waived.
KNOWN_BUGS: dict[str, str] = {}


def page(fdp) -> int:
    return GPA + 4096 * fdp.ConsumeIntInRange(0, PAGES - 1)


def addr52(fdp, align: int) -> int:
    """A guest-physical address: mostly in RAM, sometimes anywhere up to 52 bits."""
    if fdp.ConsumeIntInRange(0, 7):
        return (page(fdp) + fdp.ConsumeIntInRange(0, 4095)) & -align
    return interesting(fdp, 52, (0, GPA - 4096, GPA + MEM_SIZE, 1 << 48, 1 << 40)) & -align


def make_ste(fdp) -> tuple[int, int]:
    if not fdp.ConsumeIntInRange(0, 15):
        return fuzzutil.u64(fdp), fuzzutil.u64(fdp)
    w0, w1 = ste(addr52(fdp, 64),
                 s1cdmax=pick(fdp, [0, 0, 0, 1, 2, 6, 10, 20, 21, 31]),
                 s1fmt=pick(fdp, [0, 0, 1, 2, 3]),
                 s1dss=pick(fdp, [0, 1, 2, 3]),
                 config=pick(fdp, [5, 5, 5, 5, 4, 0, 1, 6, 7]),
                 valid=bool(fdp.ConsumeIntInRange(0, 15)),
                 s1stalld=not fdp.ConsumeIntInRange(0, 15))
    if not fdp.ConsumeIntInRange(0, 7):
        w0 ^= 1 << fdp.ConsumeIntInRange(0, 63)
    return w0, w1


def make_cd(fdp) -> bytes:
    if not fdp.ConsumeIntInRange(0, 15):
        return fdp.ConsumeBytes(64).ljust(64, b"\0")
    rare = lambda: not fdp.ConsumeIntInRange(0, 7)  # noqa: E731
    return cd(ttb0=addr52(fdp, 16), ttb1=addr52(fdp, 16),
              t0sz=pick(fdp, [16, 16, 25, 33, 39, 12, 40, 63]),
              t1sz=pick(fdp, [16, 16, 25, 33, 39, 12, 40, 63]),
              tg0=pick(fdp, [0, 0, 1, 2, 3]), tg1=pick(fdp, [2, 2, 1, 3, 0]),
              epd0=rare(), epd1=bool(fdp.ConsumeIntInRange(0, 3)),
              ips=pick(fdp, [5, 5, 0, 1, 2, 3, 4, 6, 7]),
              asid=interesting(fdp, 16, (0, 1, 2)), affd=rare(), tbi0=rare(), tbi1=rare(),
              had0=rare(), had1=rare(), valid=not rare(), aa64=not rare(), record=not rare(),
              abort=not rare(), endi=rare(), stall=rare(), ha=rare(), hd=rare())


def make_desc(fdp) -> int:
    kind = fdp.ConsumeIntInRange(0, 9)
    attrs = 0
    for b in (hw.DESC_AP1, hw.DESC_AP2, hw.DESC_PXN, hw.DESC_UXN):
        attrs |= (1 << b) if not fdp.ConsumeIntInRange(0, 3) else 0
    if kind <= 3:  # table
        hier = 0
        for b in (hw.DESC_PXNTABLE, hw.DESC_UXNTABLE, hw.DESC_APTABLE0, hw.DESC_APTABLE1):
            hier |= (1 << b) if not fdp.ConsumeIntInRange(0, 7) else 0
        return addr52(fdp, 4096) | 3 | hier
    if kind <= 6:  # page (level 3) or table-type at levels 0-2: it is the same encoding
        af = 0 if not fdp.ConsumeIntInRange(0, 7) else 1 << hw.DESC_AF
        return addr52(fdp, 4096) | 3 | af | (attrs | 1 << hw.DESC_AP1) & ~(
            0 if fdp.ConsumeIntInRange(0, 3) else 1 << hw.DESC_AP1)
    if kind == 7:  # block
        return (interesting(fdp, 48, (0, GPA, 1 << 30, 1 << 21)) & ~0x1F_FFFF) | 1 \
            | 1 << hw.DESC_AF | attrs
    if kind == 8:
        return 0
    return fuzzutil.u64(fdp)


def descriptor_slot(fdp) -> int:
    """Where a descriptor goes: a page and an index, the index often the one some IOVA of
    IOVAS uses at some level for some granule, so walks find what the fuzzer wrote."""
    base = page(fdp)
    if fdp.ConsumeIntInRange(0, 3):
        iova = pick(fdp, IOVAS)
        g = pick(fdp, [12, 12, 14, 16])
        level = fdp.ConsumeIntInRange(0, 3)
        index = (iova >> (g + (g - 3) * (3 - level))) & ((1 << (g - 3)) - 1)
        return (base & -(1 << g)) + 8 * index if 8 * index < MEM_SIZE else base
    return base + 8 * fdp.ConsumeIntInRange(0, 511)


class Ram:
    """What pagetables.Stage1Tables needs (alloc, read64, write64), over the pair's memory."""

    def __init__(self, mem: GuestMemory, engine: Engine) -> None:
        self.mem, self.engine = mem, engine  # not the Pair: no reference cycle
        self.next = GPA + MEM_SIZE // 2  # the upper half; raw writes may still land there

    def alloc(self, size: int, align: int = 4096) -> int:
        gpa = (self.next + align - 1) & -align
        if gpa + size > GPA + MEM_SIZE:
            raise MemoryError("scenario RAM exhausted")
        self.next = gpa + size
        return gpa

    def read64(self, gpa: int) -> int:
        """Tables the fuzzer pointed outside RAM read as empty (the builder then makes one)."""
        if not self.mem.contains(gpa, 8):
            return 0
        return struct.unpack("<Q", self.mem.read(gpa, 8))[0]

    def write64(self, gpa: int, value: int) -> None:
        if self.mem.contains(gpa, 8):
            self.mem.write(gpa, struct.pack("<Q", value))
        self.engine.invalidate_all()


class Pair:
    """The engine and its oracle, driven in lockstep."""

    def __init__(self, fdp) -> None:
        self.fdp = fdp
        self.ram = bytearray(MEM_SIZE)
        self.mem = GuestMemory()
        self.mem.add_region(GPA, MEM_SIZE, UADDR, self.ram)
        self.buffers = [self.ram]
        self.engine = Engine(self.mem, iotlb_size=pick(fdp, [4096, 4096, 0, 4, 64]))
        self.ref = ReferenceEngine(self.mem)
        self.table = MappingTable()
        self.alloc = Ram(self.mem, self.engine)
        self.hot: list[int] = []  # IOVAs a built scenario maps

    def tables(self, granule: int, va_bits: int) -> Stage1Tables:
        """Stage-1 tables with a few leaves (pages, blocks) mapping pages of RAM."""
        fdp = self.fdp
        tables = Stage1Tables(self.alloc, granule, va_bits)
        shift = granule.bit_length() - 1
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            va = pick(fdp, [0, 0x1000, 0x20_0000, 0x4000_0000, 1 << 30, 0x1234_5000,
                            (1 << va_bits) - granule])
            va = (va & ((1 << va_bits) - 1)) & -granule
            level = pick(fdp, [3, 3, 3, 2, 1] if granule == 4096 else [3, 3, 2])
            block = 1 << (shift + (shift - 3) * (3 - level))
            oa = page(fdp) & -block if level < 3 else page(fdp) & -granule
            tables.map(va, oa, level=level, ap_ro=not fdp.ConsumeIntInRange(0, 3),
                       ap_el0=bool(fdp.ConsumeIntInRange(0, 3)),
                       af=bool(fdp.ConsumeIntInRange(0, 7)), pxn=fdp.ConsumeBool(),
                       uxn=fdp.ConsumeBool(),
                       table_bits=0 if fdp.ConsumeIntInRange(0, 3) else 1 << pick(
                           fdp, [hw.DESC_APTABLE0, hw.DESC_APTABLE1, hw.DESC_PXNTABLE,
                                 hw.DESC_UXNTABLE]))
            self.hot.append(va)
        return tables

    def build(self) -> None:
        """A well-formed page-table stream (as tests/pagetables builds them): CD table
        (linear or 2-level, with SubstreamIDs or not), TTB0 and maybe TTB1 tables."""
        fdp = self.fdp
        granule = pick(fdp, [4096, 4096, 16384, 65536])
        va_bits = pick(fdp, [48, 48, 39, 36, 25, 42])
        try:
            t0 = self.tables(granule, va_bits)
            t1 = self.tables(granule, va_bits) if not fdp.ConsumeIntInRange(0, 3) else None
            if t1 is not None:
                self.hot += [((1 << 64) - (1 << va_bits)) | va for va in self.hot[-2:]]
            cdmax = pick(fdp, [0, 0, 2, 6])
            fmt = pick(fdp, [0, 1, 2]) if cdmax else 0
            descriptor = cd(ttb0=t0.root, t0sz=64 - va_bits, granule=granule,
                            ttb1=t1.root if t1 else 0, t1sz=64 - va_bits, epd1=t1 is None,
                            asid=fdp.ConsumeIntInRange(0, 3), affd=not fdp.ConsumeIntInRange(0, 7),
                            tbi0=not fdp.ConsumeIntInRange(0, 7),
                            record=bool(fdp.ConsumeIntInRange(0, 7)))
            if fmt == 0:
                base = self.alloc.alloc(64 << cdmax, 64)
                for ssid in range(1 << cdmax):
                    self.write(base + 64 * ssid, descriptor)
            else:
                split = 6 if fmt == 1 else 10
                base = self.alloc.alloc(8 * max(1, (1 << cdmax) >> split), 64)
                leaf = self.alloc.alloc(64 << min(cdmax, split), 4096)
                self.write(base, struct.pack("<Q", l1cd(leaf)))
                for ssid in range(1 << min(cdmax, split)):
                    self.write(leaf + 64 * ssid, descriptor)
        except MemoryError:
            return
        w0, w1 = ste(base, s1cdmax=cdmax, s1fmt=fmt, s1dss=pick(fdp, [0, 1, 2]))
        sid = pick(fdp, SIDS)
        self.engine.set_stream_table(sid, w0, w1)
        self.ref.set_stream_table(sid, w0, w1)

    def write(self, gpa: int, data: bytes) -> None:
        if self.mem.contains(gpa, len(data)):
            self.mem.write(gpa, data)
        self.engine.invalidate_all()  # the walk may now differ: as after a TLBI ALL

    def configure(self) -> None:
        fdp = self.fdp
        sid = pick(fdp, SIDS)
        mode = fdp.ConsumeIntInRange(0, 9)
        if mode <= 5:
            w0, w1 = make_ste(fdp)
            self.engine.set_stream_table(sid, w0, w1)
            self.ref.set_stream_table(sid, w0, w1)
        elif mode == 6:
            self.engine.set_stream_bypass(sid)
            self.ref.set_stream_bypass(sid)
        elif mode == 7:
            self.engine.set_stream_blocked(sid)
            self.ref.set_stream_blocked(sid)
        elif mode == 8:
            asid = fdp.ConsumeIntInRange(0, 3)
            self.engine.set_stream_map(sid, self.table, asid)
            self.ref.set_stream_map(sid, self.table, asid)
        else:
            got, want = self.engine.clear_stream(sid), self.ref.clear_stream(sid)
            check(got == want, f"clear_stream({sid}) {got} != reference {want}")

    def mapping(self) -> None:
        fdp = self.fdp
        start = interesting(fdp, 64, (0, 0x1000, 0x10_0000, GPA)) & ~0xFFF
        if fdp.ConsumeIntInRange(0, 3) == 0:
            start |= fdp.ConsumeIntInRange(0, 0xFFF)
        size = interesting(fdp, 64, (0x1000, 0x2000, 0x800, 0x10_0000)) or 1
        end = min(start + size - 1, (1 << 64) - 1)
        if fdp.ConsumeIntInRange(0, 2):
            phys = interesting(fdp, 64, (GPA, GPA + 0x1800, 0, 1 << 48, (1 << 64) - 0x1000))
            try:
                self.table.add(Mapping(start, end, phys, fdp.ConsumeIntInRange(0, 7)))
            except OverlapError:
                pass
        else:
            try:
                self.table.remove_range(start, end)
            except SplitError:
                pass

    def stage2(self) -> None:
        fdp = self.fdp
        if not fdp.ConsumeIntInRange(0, 7):
            self.engine.s2_reset()
            self.ref.s2_reset()
            return
        ipa = interesting(fdp, 64, (GPA, GPA + 0x3000, GPA + 0x3800, 0, 1 << 48))
        size = interesting(fdp, 64, (0x1000, 0x800, 0x2000, 1, MEM_SIZE, 1 << 63))
        read, write = fdp.ConsumeBool(), fdp.ConsumeBool()
        try:
            got = self.engine.s2_set_perm(ipa, size, read, write)
        except ValueError:
            check(size == 0 or ipa + size - 1 >= 1 << 64, f"s2_set_perm({ipa:#x}, {size:#x}) "
                                                          f"refused")
            return
        check(size and ipa + size - 1 < 1 << 64, f"s2_set_perm({ipa:#x}, {size:#x}) accepted")
        want = self.ref.s2_set_perm(ipa, size, read, write)
        check(got == want, f"s2_set_perm({ipa:#x}, {size:#x}): {got} pages != reference {want}")

    def new_region(self) -> None:
        fdp = self.fdp
        if len(self.buffers) >= 4:
            return
        size = pick(fdp, [0x1000, 0x2000, 0x1800, 0x4000])
        gpa = interesting(fdp, 52, (0, GPA + MEM_SIZE, GPA - size, 1 << 40, GPA + 0x2000))
        buf = bytearray(fdp.ConsumeBytes(size).ljust(size, b"\0"))
        try:
            self.mem.add_region(gpa, size, UADDR + 0x100_0000 * len(self.buffers), buf)
        except ValueError:
            return
        self.buffers.append(buf)

    def translate(self) -> None:
        fdp = self.fdp
        sid = pick(fdp, SIDS) if fdp.ConsumeIntInRange(0, 15) else fuzzutil.u32(fdp)
        ssid = pick(fdp, [-1, -1, -1, -1, 0, 1, 2, 3, 63, 64, (1 << 20) - 1, 1 << 20, -2])
        choice = fdp.ConsumeIntInRange(0, 7)
        if self.hot and choice <= 3:
            iova = pick(fdp, self.hot)
        else:
            iova = pick(fdp, IOVAS) if choice <= 6 else fuzzutil.u64(fdp)
        if fdp.ConsumeIntInRange(0, 3) == 0:
            iova = (iova + fdp.ConsumeIntInRange(0, 0x2FFF)) & ((1 << 64) - 1)
        access = pick(fdp, VALID_ACCESS) if fdp.ConsumeIntInRange(0, 15) else pick(
            fdp, [0, PRIV, 16, 17, -1])
        bad_args = not -1 <= ssid < 1 << 20 or access not in VALID_ACCESS
        if fdp.ConsumeIntInRange(0, 3):
            size = pick(fdp, [1, 1, 4096, 8, 0])
            try:
                got = self.engine.translate(sid, ssid, iova, size, access)
            except ValueError:
                check(bad_args or size == 0, f"translate({sid}, {ssid}, {iova:#x}, {size}, "
                                             f"{access}) refused")
                return
            check(not bad_args and size != 0, f"translate accepted ssid {ssid} access {access} "
                                              f"size {size}")
            want = self.ref.translate(sid, ssid, iova, size, access)
            what = f"translate(sid={sid}, ssid={ssid}, iova={iova:#x}, access={access})"
        else:
            n = pick(fdp, [1, 8, 4096, 5000, 12288])
            flags = access & (EXEC | PRIV)
            try:
                got = self.engine.dma_read(sid, ssid, iova, n, flags)
            except ValueError:
                check(not -1 <= ssid < 1 << 20, f"dma_read(ssid={ssid}, flags={flags}) refused")
                return
            want = self.ref.dma_read(sid, ssid, iova, n, flags)
            what = f"dma_read(sid={sid}, ssid={ssid}, iova={iova:#x}, n={n}, flags={flags})"
        if got != want:
            raise fuzzutil.PropertyViolation(
                f"{what}: engine {describe(got)} != reference {describe(want)}")

    def s2_perm(self) -> None:
        ipa = interesting(self.fdp, 64, (GPA, GPA + MEM_SIZE - 1, GPA + MEM_SIZE, 0, 1 << 48))
        got, want = self.engine.s2_perm(ipa), self.ref.s2_perm(ipa)
        check(got == want, f"s2_perm({ipa:#x}) {got} != reference {want}")

    def invalidate(self) -> None:
        fdp = self.fdp
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:
            self.engine.invalidate_stream(pick(fdp, SIDS))
        elif kind == 1:
            self.engine.invalidate_asid(fdp.ConsumeIntInRange(0, 3))
        elif kind == 2:
            self.engine.invalidate_range(pick(fdp, SIDS), pick(fdp, IOVAS),
                                         interesting(fdp, 64, (0x1000, 0, 1 << 63)))
        else:
            self.engine.invalidate_all()


def describe(result) -> str:
    value, record = result
    if value is not None:
        return f"({value!r:.60}, None)" if isinstance(value, bytes) else f"({value:#x}, None)"
    if record is None:
        return "(None, None): terminated without an event"
    return f"event {EventRecord.decode(record)}"


@fuzzutil.maybe_instrument(__name__)
def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    pair = Pair(fdp)
    if fdp.ConsumeIntInRange(0, 3):
        pair.build()
    for _ in range(fdp.ConsumeIntInRange(0, 8)):  # structures first
        what = fdp.ConsumeIntInRange(0, 3)
        if what == 0:
            pair.write(addr52(fdp, 64), make_cd(fdp))
        elif what == 1:
            pair.write(descriptor_slot(fdp), struct.pack("<Q", make_desc(fdp)))
        elif what == 2:
            pair.write(addr52(fdp, 8), struct.pack("<Q", l1cd(addr52(fdp, 4096),
                                                             fdp.ConsumeIntInRange(0, 7) > 0)))
        else:
            pair.configure()
    for _ in range(48):
        if fdp.remaining_bytes() == 0:
            break
        op = fdp.ConsumeIntInRange(0, 15)
        if op <= 6:
            pair.translate()
        elif op == 7:
            pair.configure()
        elif op == 8:
            kind = fdp.ConsumeIntInRange(0, 2)
            if kind == 0:
                pair.write(addr52(fdp, 64), make_cd(fdp))
            else:
                pair.write(descriptor_slot(fdp), struct.pack("<Q", make_desc(fdp)))
        elif op == 9:
            pair.mapping()
        elif op == 10:
            pair.stage2()
        elif op == 11:
            pair.s2_perm()
        elif op == 12:
            pair.invalidate()
        elif op == 13:
            pair.new_region() if fdp.ConsumeIntInRange(0, 3) == 0 else pair.build()
        else:
            pair.configure()


if __name__ == "__main__":
    fuzzutil.run(one_input)
