"""Fuzz the virtio-blk requestq walker (ext/blkq.pxi, ext/blk_requests.pxi) against a plain
Python statement of it (blk_model.py).

Guest RAM is the middle of one bytearray with guard bytes on both sides; the endpoint's
stream is in MAP mode, its pages mapped (identity by default) with flags the fuzzer picks,
some unmapped, remapped, or cut off at stage 2. The guest (the fuzzer) builds requests the
way Linux's virtio_blk does (header, data, status; direct chains or indirect tables; every
request type, sectors in and out of range), and writes raw descriptors, avail entries and
indices, and bytes anywhere (rings and tables included); between device calls it changes
mappings, stage 2, the avail flags, resets and re-enables the queue. The image is a file
in /dev/shm (punch-hole and O_DIRECT-free pwrite behave the same every run).

After each serve, the BlkQueue and the model, started from the same state, must agree on:
every byte of the bytearray (guards included: nothing outside the device-writable buffers
and the used ring changes), every byte of the image, the number served, the stop reason,
the indices, the fault records (byte for byte, in order, and how many were dropped) and
whether an interrupt is due. Nothing else may raise.
"""

from __future__ import annotations

import os
import struct
import tempfile

import atheris
import fuzzutil
from fuzzutil import check, interesting, pick

with fuzzutil.instrumented(__name__):
    from blk_model import F_INDIRECT, F_NEXT, F_WRITE, PAGE, Model
    from viommu import _dataplane as hw
    from viommu.device.mappings import Mapping

instrument = fuzzutil.maybe_instrument(__name__)

GUARD = 64
GUARD_BYTE = 0xA5
PAGES = 32
REGION = PAGES * PAGE
GPA = 0x4000_0000
UADDR = 0x7F00_0000_0000
IOVA = 0x10_0000  # IOVA page k is GPA page k unless the fuzzer says otherwise
SID = 0x200
IMAGE_SIZE = 64 * 1024  # 128 sectors
SERIAL = b"fuzz-blk"
RING_PAGES = 2  # desc at page 0, avail at page 1, used at page 1 + 0x400
TYPES = (0, 1, 4, 8, 11, 13, 2, 10, 14, 99, 0xFFFF_FFFF)
RW = 3

_image_fd = -1
_image_pattern = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(IMAGE_SIZE))


def image_fd() -> int:
    global _image_fd
    if _image_fd < 0:
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="viommu-fuzz-blk-", dir=where)
        os.unlink(path)
        _image_fd = fd
    os.ftruncate(_image_fd, 0)
    os.pwrite(_image_fd, _image_pattern, 0)
    return _image_fd


class Guest:
    """The driver side: allocates buffers in RAM pages RING_PAGES.., writes requests."""

    def __init__(self, fdp: atheris.FuzzedDataProvider, buf: bytearray, num: int) -> None:
        self.fdp, self.buf, self.num = fdp, buf, num
        self.next = RING_PAGES * PAGE
        self.free = 0
        self.avail_idx = 0

    def poke(self, off: int, data: bytes) -> None:
        off %= REGION
        data = data[:REGION - off]
        self.buf[GUARD + off:GUARD + off + len(data)] = data

    def alloc(self, size: int, align: int = 8) -> int | None:
        """An IOVA (identity-mapped) of `size` bytes, possibly straddling pages."""
        if self.fdp.ConsumeIntInRange(0, 7) == 0:  # anywhere, at any alignment
            off = self.fdp.ConsumeIntInRange(RING_PAGES * PAGE, REGION - 1)
        else:
            off = (self.next + align - 1) & ~(align - 1)
        if off + size > REGION:
            self.next = RING_PAGES * PAGE
            return None
        self.next = off + size
        return IOVA + off

    def write_iova(self, iova: int, data: bytes) -> None:
        self.poke(iova - IOVA, data)

    def set_desc(self, table_iova: int, i: int, addr: int, length: int, flags: int,
                 nxt: int) -> None:
        self.write_iova(table_iova + 16 * i, struct.pack("<QIHH", addr & (2**64 - 1),
                                                         length & 0xFFFF_FFFF, flags, nxt))

    @instrument
    def request(self) -> int | None:
        fdp = self.fdp
        kind = pick(fdp, TYPES)
        sector = interesting(fdp, 64, likely=(0, 1, 8, 120, 127, 128, 129))
        header = self.alloc(16, align=pick(fdp, [16, 1, 8]))
        if header is None:
            return None
        self.write_iova(header, struct.pack("<IIQ", kind, fdp.ConsumeIntInRange(0, 7), sector))
        segs = [(header, 16, False)]
        if kind in (11, 13):  # discard / write zeroes segments
            count = fdp.ConsumeIntInRange(0, 3)
            body = b"".join(struct.pack("<QII", interesting(fdp, 64, likely=(0, 4, 120)),
                                        interesting(fdp, 32, likely=(1, 8, 128)),
                                        pick(fdp, [0, 0, 1, 2])) for _ in range(count))
            where = self.alloc(max(len(body), 1))
            if where is not None and body:
                self.write_iova(where, body)
                segs.append((where, len(body), False))
        length = pick(fdp, [512, 1024, 4096, 0, 700, 8192, 20,
                            fdp.ConsumeIntInRange(0, 3 * PAGE)])
        if length:
            data = self.alloc(length, align=pick(fdp, [PAGE, 512, 1]))
            if data is not None:
                writable = kind != 1
                if not writable:
                    self.write_iova(data, fdp.ConsumeBytes(length).ljust(length, b"\x5a"))
                pieces = fdp.ConsumeIntInRange(1, 4)
                step = -(-length // pieces)
                for off in range(0, length, step):
                    segs.append((data + off, min(step, length - off), writable))
        status = self.alloc(1, align=1)
        if status is None:
            return None
        segs.append((status, 1, True))
        return self.add_chain(segs, indirect=fdp.ConsumeBool())

    def add_chain(self, segs: list[tuple[int, int, bool]], indirect: bool) -> int | None:
        head = self.free
        if indirect:
            table = self.alloc(16 * len(segs), align=16)
            if table is None:
                return None
            for i, (addr, length, w) in enumerate(segs):
                last = i == len(segs) - 1
                self.set_desc(table, i, addr, length, (F_WRITE if w else 0) |
                              (0 if last else F_NEXT), i + 1)
            self.set_desc(IOVA, head, table, 16 * len(segs), F_INDIRECT, 0)
            self.free = (head + 1) % self.num
            return head
        if len(segs) > self.num:
            return None
        for i, (addr, length, w) in enumerate(segs):
            index = (head + i) % self.num
            last = i == len(segs) - 1
            self.set_desc(IOVA, index, addr, length, (F_WRITE if w else 0) |
                          (0 if last else F_NEXT), (index + 1) % self.num)
        self.free = (head + len(segs)) % self.num
        return head

    def publish(self, head: int) -> None:
        avail = PAGE
        self.poke(avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.poke(avail + 2, struct.pack("<H", self.avail_idx))


def compare(queue, model: Model, buf: bytearray, mbuf: bytearray, fd: int, served: int,
            want: int, what: str) -> None:
    check(served == want, f"{what}: served {served}, model {want}")
    check(queue.error == model.error, f"{what}: error {queue.error} ({queue.error_text()}), "
                                      f"model {model.error}")
    check((queue.last_avail, queue.used_idx) == (model.last_avail, model.used_idx),
          f"{what}: indices {(queue.last_avail, queue.used_idx)}, model "
          f"{(model.last_avail, model.used_idx)}")
    records, dropped = queue.take_faults()
    check((records, dropped) == (model.faults, model.dropped),
          f"{what}: {len(records)} fault records ({dropped} dropped), model "
          f"{len(model.faults)} ({model.dropped})")
    model.faults, model.dropped = [], 0
    check(queue.take_interrupt() == model.interrupt, f"{what}: interrupt differs")
    model.interrupt = False
    if buf != mbuf:
        diff = next(i for i in range(len(buf)) if buf[i] != mbuf[i])
        raise fuzzutil.PropertyViolation(
            f"{what}: RAM differs first at offset {diff - GUARD:#x} ({buf[diff]:#x} vs model "
            f"{mbuf[diff]:#x})")
    check(os.pread(fd, IMAGE_SIZE + 1, 0) == bytes(model.image), f"{what}: the image differs")


def remap(fdp, table, engine) -> None:
    """Unmap a page, or map it again with other flags or to another page."""
    page = fdp.ConsumeIntInRange(0, PAGES - 1)
    iova = IOVA + page * PAGE
    if table.lookup(iova) is not None:
        table.remove_range(iova, iova + PAGE - 1)
    if fdp.ConsumeIntInRange(0, 2):
        target = page if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, PAGES)  # PAGES: past RAM
        table.add(Mapping(iova, iova + PAGE - 1, GPA + target * PAGE, pick(fdp, [1, 2, RW, RW])))


@instrument
def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    buf = bytearray([GUARD_BYTE]) * GUARD + bytearray(REGION) + bytearray([GUARD_BYTE]) * GUARD
    mem = hw.GuestMemory()
    mem.add_region(GPA, REGION, UADDR, buf, GUARD)
    engine = hw.Engine(mem)
    table = hw.MappingTable()
    for page in range(PAGES):
        table.add(Mapping(IOVA + page * PAGE, IOVA + page * PAGE + PAGE - 1, GPA + page * PAGE,
                          RW))
    engine.set_stream_map(SID, table, 1)
    fd = image_fd()

    num = pick(fdp, [16, 16, 64, 256, 1, 2, 4, 8, 32, 128])
    read_only, indirect, discard, zeroes = (fdp.ConsumeBool() and fdp.ConsumeBool(),
                                            fdp.ConsumeIntInRange(0, 3) > 0, fdp.ConsumeBool(),
                                            fdp.ConsumeBool())
    rings = (IOVA, IOVA + PAGE, IOVA + PAGE + 0x400)
    if not fdp.ConsumeIntInRange(0, 15):  # anywhere, possibly misaligned or unmapped
        rings = tuple(interesting(fdp, 64, likely=(IOVA, IOVA + PAGE - 2, IOVA + 2 * PAGE))
                      for _ in range(3))
    queue = hw.BlkQueue(SID)
    queue.set_backing(fd, IMAGE_SIZE // 512, read_only, SERIAL)
    queue.set_features(indirect, discard, zeroes)
    queue.set_ring(num, *rings)
    model = Model(engine, SID, bytearray(buf), GUARD, GPA, bytearray(_image_pattern), SERIAL)
    model.num, (model.desc, model.avail, model.used) = num, rings
    model.read_only, model.indirect, model.discard, model.write_zeroes = (read_only, indirect,
                                                                          discard, zeroes)
    aligned = rings[0] % 16 == 0 and rings[1] % 2 == 0 and rings[2] % 4 == 0
    check(queue.enable() == aligned, f"enable() with rings {[hex(r) for r in rings]}")
    model.enabled = True
    model.error = 0 if aligned else 11

    guest = Guest(fdp, buf, num)
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        head = guest.request()
        if head is not None:
            guest.publish(head)
    for step in range(24):
        if fdp.remaining_bytes() == 0:
            break
        op = fdp.ConsumeIntInRange(0, 11)
        if op <= 2:
            head = guest.request()
            if head is not None:
                guest.publish(head)
        elif op == 3:  # a raw descriptor
            guest.set_desc(IOVA, fdp.ConsumeIntInRange(0, num - 1),
                           interesting(fdp, 64, likely=(IOVA, IOVA + 3 * PAGE, IOVA + REGION)),
                           interesting(fdp, 32, likely=(16, 1, 512, 4096, 32, 48)),
                           fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, num + 1))
            guest.publish(fdp.ConsumeIntInRange(0, num + 1))
        elif op == 4:  # bytes anywhere, rings and tables included
            guest.poke(fdp.ConsumeIntInRange(0, REGION - 1), fdp.ConsumeBytes(
                fdp.ConsumeIntInRange(1, 16)))
        elif op == 5:
            guest.poke(PAGE + 2, struct.pack("<H", fuzzutil.u16(fdp)))  # an index jump
        elif op == 6:
            remap(fdp, table, engine)
        elif op == 7:  # the host's stage 2 under one page
            page = fdp.ConsumeIntInRange(0, PAGES - 1)
            if fdp.ConsumeIntInRange(0, 3):
                engine.s2_set_perm(GPA + page * PAGE, PAGE, fdp.ConsumeBool(), False)
            else:
                engine.s2_reset()
        elif op == 8:
            guest.poke(PAGE, struct.pack("<H", fdp.ConsumeIntInRange(0, 1)))  # NO_INTERRUPT
        elif op == 9 and not fdp.ConsumeIntInRange(0, 3):  # the driver resets the device
            queue.reset()
            model.error, model.enabled = 0, False
            model.last_avail = model.used_idx = 0
            model.faults, model.dropped, model.interrupt = [], 0, False
            if fdp.ConsumeBool():
                check(queue.enable() == aligned, "enable() after reset")
                model.enabled = True
                model.error = 0 if aligned else 11
                guest.avail_idx = 0
                guest.poke(PAGE + 2, b"\0\0")
        else:
            model.ram[:] = buf
            served = queue.serve(engine)
            want = model.serve()
            compare(queue, model, buf, model.ram, fd, served, want, f"serve #{step}")


if __name__ == "__main__":
    fuzzutil.run(one_input)
