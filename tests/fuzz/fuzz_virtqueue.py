"""Fuzz the split-ring walker and the virtio-iommu request parser (ext/virtqueue.pxi and
ext/requests.pxi).

The guest (the fuzzer) writes descriptors, avail ring entries and indices, and request
bytes into synthetic guest RAM: well-formed requests of every type (1..8 and garbage),
raw descriptors (loops, chains past the queue size, addresses outside every region, zero and
huge lengths, INDIRECT, readable-after-writable), index jumps, concurrent pokes. The device
serves them with `VirtQueue.process_requests` and a real `VirtioIommuDevice` (features
including viommu's private bits 62/63), and pushes fault records with `push_event`.

Guest RAM is the middle of one bytearray (`add_region(..., buffer, GUARD)`), with guard
bytes on both sides. Before each device call the harness copies the whole bytearray and
replays the call on the copy with `RingModel`, a plain Python statement of the split-ring
rules the data plane documents, fed with the answers the device's handler really gave.
The two bytearrays must then be equal byte for byte: the device wrote exactly the used
ring, the request tails/payloads and event records, in their writable buffers, and nothing
else (guards included). Also checked: each popped chain gets exactly one used entry; used
lengths are 0, 4, probe_size+4 (or, for a PROBE whose buffer is too small, its whole
writable length with S_INVAL); the decoded request fields equal the bytes the guest wrote;
RingError (and an exception the handler raised) are the only exceptions.
"""

from __future__ import annotations

import struct

import atheris
import fuzzutil
from fuzzutil import check, interesting, pick

with fuzzutil.instrumented(__name__):
    from viommu._dataplane import GuestMemory, RingError, VirtQueue
    from viommu.device.virtio_iommu import DeviceConfig, VirtioIommuDevice
    from viommu.uapi import VIOMMU_F_ATTACH_TABLE, VIOMMU_F_PAGE_REQUEST, RequestType, Status

instrument = fuzzutil.maybe_instrument(__name__)

GUARD = 64
GUARD_BYTE = 0xA5
REGION = 0x10000
GPA = 0x4000_0000
UADDR = 0x7F00_0000_0000
DEFAULT_RINGS = (0x0000, 0x1000, 0x2000)  # desc, avail, used offsets (num <= 256 fits)
DATA = 0x3000
ENDPOINTS = (1, 256)
PROBE_SIZE = 512

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
READABLE = {1: 20, 2: 20, 3: 36, 4: 28, 5: 72, 6: 124, 7: 60, 8: 24}
MAX_READABLE = 124
MAX_WRITABLE_SEGMENTS = 8
MAX_WRITABLE_LEN = 65536 + 4
PROBE = int(RequestType.VIRTIO_IOMMU_T_PROBE)
FIELDS = ("type", "domain", "endpoint", "flags", "virt_start", "virt_end", "phys_start",
          "reserved_zero", "format", "ste0", "ste1", "scope", "caches", "pasid", "arch_id",
          "address", "nr_pages", "page_size", "grpid", "code", "readable_len", "writable_len")

EMPTY, RINGERROR, MALFORMED, CHAIN = "empty", "ringerror", "malformed", "chain"


class InjectedError(Exception):
    """Raised by the harness's handler on purpose: process_requests must answer the chain
    (used length 0) and let the exception through."""


def _u16(b, off):
    return struct.unpack_from("<H", b, off)[0]


def _u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


def _u64(b, off):
    return struct.unpack_from("<Q", b, off)[0]


def decode_fields(buf: bytes, readable: int, writable: int) -> dict:
    """What Request must hold for readable bytes `buf` (the first 124): the layouts of
    virtio spec 5.13.6 and viommu's private requests, written out independently."""
    f = dict.fromkeys(FIELDS, 0)
    t = buf[0]
    f.update(type=t, reserved_zero=True, readable_len=min(readable, 0xFFFF_FFFF),
             writable_len=writable)
    if t == 1:
        f.update(domain=_u32(buf, 4), endpoint=_u32(buf, 8), flags=_u32(buf, 12),
                 reserved_zero=_u32(buf, 16) == 0)
    elif t == 2:
        f.update(domain=_u32(buf, 4), endpoint=_u32(buf, 8), reserved_zero=_u64(buf, 12) == 0)
    elif t == 3:
        f.update(domain=_u32(buf, 4), virt_start=_u64(buf, 8), virt_end=_u64(buf, 16),
                 phys_start=_u64(buf, 24), flags=_u32(buf, 32))
    elif t == 4:
        f.update(domain=_u32(buf, 4), virt_start=_u64(buf, 8), virt_end=_u64(buf, 16),
                 reserved_zero=_u32(buf, 24) == 0)
    elif t == 5:
        f.update(endpoint=_u32(buf, 4))
    elif t == 6:
        f.update(domain=_u32(buf, 4), endpoint=_u32(buf, 8), format=buf[12], ste0=_u64(buf, 16),
                 ste1=_u64(buf, 24), reserved_zero=not any(buf[13:16]) and not any(buf[32:124]))
    elif t == 7:
        f.update(scope=buf[4], caches=buf[5], flags=_u16(buf, 6), domain=_u32(buf, 8),
                 pasid=_u32(buf, 12), arch_id=_u64(buf, 16), address=_u64(buf, 24),
                 nr_pages=_u64(buf, 32), page_size=buf[40],
                 reserved_zero=not any(buf[41:60]))
    elif t == 8:
        f.update(endpoint=_u32(buf, 4), pasid=_u32(buf, 8), grpid=_u16(buf, 12),
                 code=_u16(buf, 14), flags=_u32(buf, 16), reserved_zero=_u32(buf, 20) == 0)
    return f


class RingModel:
    """A split virtqueue over a bytearray (guest RAM at `base` in it), as virtio 1.x 2.7 and
    the data plane's docstrings state it: malformed chains are returned with used length 0,
    a corrupt ring (avail index too far ahead, head >= size) is RingError, and stays so
    until the ring is started again (`broken`)."""

    def __init__(self, ram: bytearray, base: int, num: int, rings: tuple[int, int, int],
                 last_avail: int, used_idx: int, broken: bool = False) -> None:
        self.ram, self.base, self.num = ram, base, num
        self.broken = broken
        self.desc, self.avail, self.used = rings
        self.last_avail, self.used_idx = last_avail, used_idx
        self.chains_seen = self.chains_malformed = self.buffers_too_small = 0
        self.used_entries: list[tuple[int, int]] = []

    def _inside(self, gpa: int, length: int) -> bool:
        return gpa >= GPA and gpa - GPA + length <= REGION

    @instrument
    def pop(self):
        """(EMPTY|RINGERROR, None, None) or (MALFORMED|CHAIN, head, [(off, len, writable)])."""
        r, a = self.ram, self.base + self.avail
        if self.broken:
            return RINGERROR, None, None
        avail_idx = _u16(r, a + 2)
        if avail_idx == self.last_avail:
            return EMPTY, None, None
        if (avail_idx - self.last_avail) & 0xFFFF > self.num:
            self.broken = True
            return RINGERROR, None, None
        head = _u16(r, a + 4 + 2 * (self.last_avail % self.num))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.num:
            self.broken = True
            return RINGERROR, None, None
        self.chains_seen += 1
        segs, seen_writable, i = [], False, head
        for _ in range(self.num):
            addr, length, flags, nxt = struct.unpack_from("<QIHH", r,
                                                          self.base + self.desc + 16 * i)
            if flags & F_INDIRECT:
                break
            if flags & F_WRITE:
                seen_writable = True
            elif seen_writable:
                break
            if length:
                if not self._inside(addr, length):
                    break
                segs.append((self.base + addr - GPA, length, bool(flags & F_WRITE)))
            if not flags & F_NEXT:
                return CHAIN, head, segs
            i = nxt
            if i >= self.num:
                break
        self.chains_malformed += 1  # a loop, INDIRECT, R after W, bad address or next
        return MALFORMED, head, None

    def push_used(self, head: int, length: int) -> None:
        elem = self.base + self.used + 4 + 8 * (self.used_idx % self.num)
        struct.pack_into("<II", self.ram, elem, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.ram, self.base + self.used + 2, self.used_idx)
        self.used_entries.append((head, length))

    def scatter(self, segs, offset: int, data: bytes) -> None:
        for off, length, _ in segs:
            if not data:
                return
            if offset >= length:
                offset -= length
                continue
            chunk = data[:length - offset]
            self.ram[off + offset:off + offset + len(chunk)] = chunk
            data = data[len(chunk):]
            offset = 0

    @instrument
    def parse(self, segs):
        """(fields, writable segments) of the request, or None for "cannot parse"."""
        readable, writable, got, wsegs = 0, 0, b"", []
        for off, length, is_w in segs:
            if is_w:
                if len(wsegs) == MAX_WRITABLE_SEGMENTS:
                    return None
                wsegs.append((off, length, True))
                writable += length
            else:
                readable += length
                if len(got) < MAX_READABLE:
                    got += bytes(self.ram[off:off + min(length, MAX_READABLE - len(got))])
        if len(got) < 4 or writable < 4 or writable > MAX_WRITABLE_LEN:
            return None
        need = READABLE.get(got[0])
        if need is None or len(got) < need:
            return None
        return decode_fields(got.ljust(MAX_READABLE, b"\0"), readable, writable), wsegs

    def process_requests(self, calls: list[dict]):
        """('ok', pushed) | ('ringerror', None) | ('raised', None), consuming `calls` (what
        the real handler was called with and answered) in order."""
        pushed = 0
        while True:
            kind, head, segs = self.pop()
            if kind == EMPTY:
                return "ok", pushed
            if kind == RINGERROR:
                return "ringerror", None
            pushed += 1
            parsed = self.parse(segs) if kind == CHAIN else None
            if parsed is None:
                self.push_used(head, 0)
                continue
            fields, wsegs = parsed
            check(bool(calls), f"chain {head}: a valid {fields['type']} request never "
                               f"reached the handler")
            call = calls.pop(0)
            check(call["fields"] == fields,
                  f"chain {head}: decoded request differs from the guest's bytes:\n"
                  f"  data plane: {call['fields']}\n  expected:   {fields}")
            if call["raised"]:
                self.push_used(head, 0)
                return "raised", None
            if call["result"] is None:
                self.push_used(head, 0)
                continue
            status, payload = call["result"]
            check(len(payload) + 4 <= fields["writable_len"],
                  f"handler payload of {len(payload)} bytes for {fields['writable_len']} "
                  f"writable")
            self.scatter(wsegs, 0, bytes(payload))
            self.scatter(wsegs, len(payload), bytes([status, 0, 0, 0]))
            self.push_used(head, len(payload) + 4)
            check_used_length(fields, status, len(payload) + 4)

    def push_event(self, record: bytes):
        while True:
            kind, head, segs = self.pop()
            if kind == EMPTY:
                return "ok", False
            if kind == RINGERROR:
                return "ringerror", None
            if kind == MALFORMED:
                self.push_used(head, 0)
                continue
            room = 0 if any(not w for _, _, w in segs) else sum(n for _, n, _ in segs)
            if room < len(record):
                self.buffers_too_small += 1
                self.push_used(head, 0)
                continue
            self.scatter(segs, 0, record)
            self.push_used(head, len(record))
            return "ok", True


def check_used_length(fields: dict, status: int, used: int) -> None:
    if fields["type"] == PROBE:
        ok = used in (0, PROBE_SIZE + 4) or (
            status == Status.S_INVAL and used == fields["writable_len"] < PROBE_SIZE + 4)
    else:
        ok = used in (0, 4)
    check(ok, f"used length {used} for request type {fields['type']} (status {status}, "
              f"writable {fields['writable_len']})")


def make_request(fdp, rtype: int) -> bytes:
    """A request of `rtype` with plausible fields (small domains, known endpoints, aligned
    ranges), so that inputs get past validation into the device's state machine."""
    def biased(bits, likely):
        return pick(fdp, list(likely)) if fdp.ConsumeIntInRange(0, 3) else interesting(
            fdp, bits, likely=likely)

    def domain():
        return biased(32, (1, 1, 2))

    def endpoint():
        return biased(32, ENDPOINTS)

    def addr():
        return biased(64, (0, 0x1000, 0x10000, 0x20_0000, 0xFEE0_0000,
                           (1 << 48) - 0x1000)) & ~0xFFF

    def end(start):
        size = biased(64, (0x1000, 0x2000, 0x10_0000)) or 0x1000
        return (start + size - 1) & ((1 << 64) - 1)

    def small(bits, likely):
        return biased(bits, likely)

    if rtype == 1:
        return struct.pack("<B3xIIII", 1, domain(), endpoint(), small(32, (0, 0, 1)),
                           small(32, (0, 0, 0)))
    if rtype == 2:
        return struct.pack("<B3xIIQ", 2, domain(), endpoint(), small(64, (0, 0, 0)))
    if rtype == 3:
        start = addr()
        return struct.pack("<B3xIQQQI", 3, domain(), start, end(start), addr(),
                           small(32, (1, 2, 3, 3, 4)))
    if rtype == 4:
        start = addr()
        return struct.pack("<B3xIQQI", 4, domain(), start, end(start), small(32, (0, 0)))
    if rtype == 5:
        return struct.pack("<B3xI64x", 5, endpoint())
    if rtype == 6:
        ste0 = interesting(fdp, 64, likely=(0x1 | 5 << 1 | GPA, 0x1 | 4 << 1, 0, 1))
        return struct.pack("<B3xIIB3xQQ92x", 6, domain(), endpoint(), small(8, (1, 1, 0)),
                           ste0, small(64, (0, 1, 2)))
    if rtype == 7:
        return struct.pack("<B3xBBHIIQQQB19x", 7, small(8, (1, 2, 3)), small(8, (1, 2, 3)),
                           small(16, (0, 1, 2)), domain(), small(32, (0, 1)), 0, addr(),
                           small(64, (1, 2, 16)), small(8, (12, 16, 21)))
    return struct.pack("<B3xIIHHII", 8, endpoint(), small(32, (0, 1)), small(16, (0, 1, 3)),
                       small(16, (0, 1, 2)), small(32, (0, 1)), small(32, (0, 0)))


class Guest:
    """The fuzzer's driver: lays out chains in `buf` (guest RAM at GUARD) and publishes them."""

    def __init__(self, fdp, buf: bytearray, num: int, rings, base: int, data_lo: int) -> None:
        self.fdp, self.buf, self.num = fdp, buf, num
        self.desc, self.avail, self.used = rings
        self.next_desc = 0
        self.avail_shadow = base
        self.data = data_lo
        self.data_lo = data_lo

    def poke(self, off: int, data: bytes) -> None:
        off = max(0, min(off, REGION - len(data)))
        self.buf[GUARD + off:GUARD + off + len(data)] = data

    def alloc(self, size: int) -> int:
        size = min(size, REGION - self.data_lo)
        if self.data + size > REGION:
            self.data = self.data_lo
        gpa = GPA + self.data
        self.data = (self.data + size + 15) & ~15
        return gpa

    def pick_addr(self, length: int) -> int:
        fdp = self.fdp
        choice = fdp.ConsumeIntInRange(0, 9)
        if choice <= 3:
            return self.alloc(max(length, 1) if length <= REGION else 16)
        if choice == 4:
            return GPA + REGION - fdp.ConsumeIntInRange(0, 64)
        if choice == 5:
            return GPA - fdp.ConsumeIntInRange(1, 64)
        if choice == 6:
            return GPA + pick(fdp, [self.desc, self.avail, self.used, self.avail + 2,
                                    self.used + 2])
        if choice == 7:
            return (1 << 64) - fdp.ConsumeIntInRange(1, 64)
        return fuzzutil.u64(fdp)

    def pick_len(self) -> int:
        return interesting(self.fdp, 32, likely=(0, 1, 4, 16, 20, 24, 32, 36, 60, 72, 124,
                                                 PROBE_SIZE + 4, 600, 0xFFFF_FFFF))

    def set_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.poke(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def _segments(self, total: int, writable: bool, max_parts: int) -> list[tuple[int, int]]:
        parts = self.fdp.ConsumeIntInRange(1, max_parts)
        sizes, left = [], total
        for _ in range(parts - 1):
            n = self.fdp.ConsumeIntInRange(0, left)
            sizes.append(n)
            left -= n
        sizes.append(left)
        return [(self.alloc(max(n, 1)), n) for n in sizes]

    @instrument
    def add_chain(self) -> int | None:
        """Write one chain's descriptors and buffers; returns its head (None: ring full)."""
        fdp = self.fdp
        kind = fdp.ConsumeIntInRange(0, 5)
        descs: list[tuple[int, int, int]] = []  # addr, len, flags (NEXT added below)
        if kind <= 2:  # a request, usually well-formed
            rtype = fdp.ConsumeIntInRange(1, 8) if fdp.ConsumeIntInRange(0, 7) else fuzzutil.u8(fdp)
            size = READABLE.get(rtype, 24)
            if not fdp.ConsumeIntInRange(0, 5):
                size = fdp.ConsumeIntInRange(0, 140)
            if rtype in READABLE and fdp.ConsumeIntInRange(0, 3):
                readable = make_request(fdp, rtype)[:size].ljust(size, b"\0")
            else:
                body = fdp.ConsumeBytes(max(size - 1, 0)).ljust(max(size - 1, 0), b"\0")
                readable = (bytes([rtype]) + body)[:size]
            wlen = pick(fdp, [4, 4, PROBE_SIZE + 4, PROBE_SIZE + 3, 3, 0, 8, MAX_WRITABLE_LEN,
                              MAX_WRITABLE_LEN + 1, fdp.ConsumeIntInRange(0, 700)])
            off = 0
            for gpa, n in self._segments(len(readable), False, 3):
                self.poke(gpa - GPA, readable[off:off + n])
                off += n
                descs.append((gpa, n, 0))
            max_w = 10 if not fdp.ConsumeIntInRange(0, 7) else 3
            for gpa, n in self._segments(min(wlen, REGION - self.data_lo), True, max_w):
                descs.append((gpa, n, F_WRITE))
            if wlen > REGION - self.data_lo and descs:  # a huge writable buffer
                descs[-1] = (GPA + self.data_lo, wlen, F_WRITE)
        elif kind == 3:  # an eventq buffer
            wlen = pick(fdp, [24, 32, 8, 23, 31, 64, fdp.ConsumeIntInRange(0, 100)])
            for gpa, n in self._segments(wlen, True, 3):
                descs.append((gpa, n, F_WRITE))
        else:  # raw descriptors, anything goes
            for _ in range(fdp.ConsumeIntInRange(1, 5)):
                length = self.pick_len()
                flags = (fdp.ConsumeIntInRange(0, 7) if fdp.ConsumeIntInRange(0, 7)
                         else fuzzutil.u16(fdp))
                descs.append((self.pick_addr(length), length, flags | 0x8000_0000))
        if not descs:
            return None
        head = self.next_desc % self.num
        for k, (addr, length, flags) in enumerate(descs):
            i = (head + k) % self.num
            nxt = (i + 1) % self.num
            if flags & 0x8000_0000:  # raw: flags and next as the fuzzer says
                flags &= 0xFFFF
                if fdp.ConsumeBool():
                    nxt = (fdp.ConsumeIntInRange(0, self.num) if fdp.ConsumeBool()
                           else fuzzutil.u16(fdp))
            else:
                flags |= F_NEXT if k < len(descs) - 1 else 0
            self.set_desc(i, addr, length, flags, nxt)
        self.next_desc = (head + len(descs)) % self.num
        return head

    def publish(self, head: int) -> None:
        if not self.fdp.ConsumeIntInRange(0, 15):
            head = fuzzutil.u16(self.fdp)  # a corrupt avail ring entry
        self.poke(self.avail + 4 + 2 * (self.avail_shadow % self.num), struct.pack("<H", head))
        self.avail_shadow = (self.avail_shadow + 1) & 0xFFFF
        self.poke(self.avail + 2, struct.pack("<H", self.avail_shadow))


def record_handler(device: VirtioIommuDevice, calls: list[dict], raise_at: int):
    def handler(req):
        fields = {name: getattr(req, name) for name in FIELDS}
        call = {"fields": fields, "raised": False, "result": None}
        calls.append(call)
        if len(calls) - 1 == raise_at:
            call["raised"] = True
            raise InjectedError("the handler failed")
        call["result"] = device.handle_request(req)
        return call["result"]
    return handler


def compare(buf: bytearray, model: RingModel, vq: VirtQueue, what: str) -> None:
    check(buf[:GUARD] == bytes([GUARD_BYTE]) * GUARD
          and buf[GUARD + REGION:] == bytes([GUARD_BYTE]) * GUARD,
          f"{what}: a guard byte outside the guest memory region was overwritten")
    if buf != model.ram:
        diff = [i - GUARD for i in range(len(buf)) if buf[i] != model.ram[i]]
        raise fuzzutil.PropertyViolation(
            f"{what}: guest RAM differs from the ring model at region offsets "
            f"{[hex(d) for d in diff[:16]]} ({len(diff)} bytes); the data plane wrote "
            f"{bytes(buf[diff[0] + GUARD:diff[0] + GUARD + 8]).hex()} where the model has "
            f"{bytes(model.ram[diff[0] + GUARD:diff[0] + GUARD + 8]).hex()}")
    got = (vq.last_avail, vq.used_idx, vq.chains_seen, vq.chains_malformed,
           vq.buffers_too_small)
    want = (model.last_avail, model.used_idx, model.chains_seen, model.chains_malformed,
            model.buffers_too_small)
    check(got == want, f"{what}: (last_avail, used_idx, chains, malformed, too_small) "
                       f"{got} != model {want}")


@instrument
def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    buf = bytearray([GUARD_BYTE]) * GUARD + bytearray(REGION) + bytearray([GUARD_BYTE]) * GUARD
    mem = GuestMemory()
    mem.add_region(GPA, REGION, UADDR, buf, GUARD)

    vq = VirtQueue(mem, 0)
    if not fdp.ConsumeIntInRange(0, 31):
        bad = pick(fdp, [0, 3, 6, 1 << 16, 65535, 32769])
        try:
            vq.set_num(bad)
        except ValueError:
            return
        raise fuzzutil.PropertyViolation(f"set_num({bad}) accepted")
    num = pick(fdp, [16, 16, 16, 64, 256, 1, 2, 4, 8, 32, 128])
    vq.set_num(num)

    layout = fdp.ConsumeIntInRange(0, 15)
    rings = DEFAULT_RINGS
    if layout == 14:  # anywhere in the region, aligned, possibly overlapping each other
        rings = (fdp.ConsumeIntInRange(0, REGION) & ~15, fdp.ConsumeIntInRange(0, REGION) & ~1,
                 fdp.ConsumeIntInRange(0, REGION) & ~3)
    uaddrs = [UADDR + r for r in rings]
    if layout == 15:  # anything at all: start() must refuse what is not inside the region
        uaddrs = [interesting(fdp, 64, likely=(UADDR, UADDR + REGION - 8, UADDR - 16))
                  for _ in range(3)]
    vq.set_addr(*uaddrs)
    base = 0 if fdp.ConsumeIntInRange(0, 3) else fuzzutil.u16(fdp)
    vq.set_base(base)
    sizes = (16 * num, 6 + 2 * num, 6 + 8 * num)
    aligned = uaddrs[0] % 16 == 0 and uaddrs[1] % 2 == 0 and uaddrs[2] % 4 == 0
    inside = all(UADDR <= u and u - UADDR + n <= REGION for u, n in zip(uaddrs, sizes,
                                                                        strict=True))
    try:
        vq.start()
    except ValueError:
        check(not (aligned and inside), f"start() refused rings {[hex(u) for u in uaddrs]}")
        return
    check(aligned and inside, f"start() accepted rings {[hex(u) for u in uaddrs]} of size {num}")
    rings = tuple(u - UADDR for u in uaddrs)
    ring_broken = False  # a RingError sticks until the ring is started again

    device = VirtioIommuDevice(ENDPOINTS, DeviceConfig(probe_size=PROBE_SIZE))
    features = VirtioIommuDevice.OFFERED_FEATURES
    if not fdp.ConsumeIntInRange(0, 3):
        features &= fuzzutil.u64(fdp) | (1 << VIOMMU_F_ATTACH_TABLE) | (1 << VIOMMU_F_PAGE_REQUEST)
    device.driver_features = features

    guest = Guest(fdp, buf, num, rings, base, DATA if layout < 14 else 0)
    guest.poke(rings[1] + 2, struct.pack("<H", base))  # avail idx = used idx = base
    guest.poke(rings[2] + 2, struct.pack("<H", base))
    for _ in range(fdp.ConsumeIntInRange(0, min(num, 6))):
        head = guest.add_chain()
        if head is not None:
            guest.publish(head)

    for _ in range(24):
        if fdp.remaining_bytes() == 0:
            break
        op = fdp.ConsumeIntInRange(0, 9)
        if op <= 1:
            head = guest.add_chain()
            if head is not None:
                guest.publish(head)
            continue
        if op == 2:  # the guest scribbles somewhere (rings included), between device calls
            off = fdp.ConsumeIntInRange(0, REGION - 1)
            guest.poke(off, fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16)))
            continue
        if op == 3:  # an index jump
            guest.poke(rings[1] + 2, struct.pack("<H", fuzzutil.u16(fdp)))
            continue
        if op == 4:
            pending = vq.avail_pending()
            want = (_u16(buf, GUARD + rings[1] + 2) - vq.last_avail) & 0xFFFF
            check(pending == want, f"avail_pending {pending} != {want}")
            vq.needs_interrupt()
            if fdp.ConsumeBool():
                vq.stop()
                vq.start()
                ring_broken = False
            continue
        model = RingModel(bytearray(buf), GUARD, num, rings, vq.last_avail, vq.used_idx,
                          ring_broken)
        model.chains_seen, model.chains_malformed = vq.chains_seen, vq.chains_malformed
        model.buffers_too_small = vq.buffers_too_small
        if op <= 7:
            calls: list[dict] = []
            raise_at = fdp.ConsumeIntInRange(0, 3) if not fdp.ConsumeIntInRange(0, 7) else -1
            outcome = None
            try:
                pushed = vq.process_requests(record_handler(device, calls, raise_at))
                outcome = ("ok", pushed)
            except RingError:
                outcome = ("ringerror", None)
            except InjectedError:
                outcome = ("raised", None)
            want = model.process_requests(calls)
            check(not calls, f"handler called {len(calls)} more time(s) than the model "
                             f"expects")
            check(outcome == want, f"process_requests: {outcome} != model {want}")
            compare(buf, model, vq, "process_requests")
            ring_broken = model.broken
        else:
            record = fdp.ConsumeBytes(pick(fdp, [24, 32, 0, 1, 8, 40,
                                                 fdp.ConsumeIntInRange(0, 80)]))
            try:
                outcome = ("ok", vq.push_event(record))
            except RingError:
                outcome = ("ringerror", None)
            want = model.push_event(record)
            check(outcome == want, f"push_event: {outcome} != model {want}")
            for _, length in model.used_entries:
                check(length in (0, len(record)), f"event used length {length}")
            compare(buf, model, vq, "push_event")
            ring_broken = model.broken


if __name__ == "__main__":
    fuzzutil.run(one_input)
