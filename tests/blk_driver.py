"""A virtio-blk driver over synthetic guest memory behind a MAP domain, for testing the block
queue (ext/blkq.pxi) and the device model without a VM.

Guest RAM is a bytearray the engine sees through a GuestMemory; the stream of the endpoint
is in MAP mode over a MappingTable, and the driver maps its rings and buffers as Linux's
dma-iommu does (drivers/iommu/dma-iommu.c): each buffer its own IOVA range with the page
offset kept, DMA_TO_DEVICE buffers readable only, DMA_FROM_DEVICE ones writable only, the
coherent rings both. Requests are built as Linux's virtio_blk builds them (virtblk_add_req:
header, data, status), in direct chains or indirect tables, and the raw helpers build
anything else.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from viommu import _dataplane as hw
from viommu.device.mappings import Mapping
from viommu.uapi import BlkRequestType, MapFlag

SID = 0x200
GPA_BASE = 0x4000_0000
PAGE = 4096
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
READ, WRITE, RW = int(MapFlag.READ), int(MapFlag.WRITE), int(MapFlag.READ | MapFlag.WRITE)
RING_IOVA = 0x1_0000
BUFFER_IOVA = 0x10_0000
T_IN, T_OUT = int(BlkRequestType.T_IN), int(BlkRequestType.T_OUT)


class FakeBlkDriver:
    def __init__(self, tmp: Path, queue_size: int = 16, mem_size: int = 4 << 20,
                 image_size: int = 1 << 20, indirect: bool = True, read_only: bool = False,
                 ring_iova: int = RING_IOVA, used_offset: int | None = None) -> None:
        self.ram = bytearray(mem_size)
        self.mem = hw.GuestMemory()
        self.mem.add_region(GPA_BASE, mem_size, 0x7F00_0000_0000, self.ram)
        self.engine = hw.Engine(self.mem)
        self.table = hw.MappingTable()
        self.engine.set_stream_map(SID, self.table, 1)
        self.size = queue_size
        self._next_gpa = GPA_BASE
        self._next_iova = BUFFER_IOVA
        # The rings, as vring_init lays them out (align 64); `used_offset` moves the used
        # ring (e.g. to make an element straddle a page).
        desc_len = 16 * queue_size
        avail_len = 6 + 2 * queue_size
        used_at = used_offset if used_offset is not None else (desc_len + avail_len + 63) & ~63
        ring_len = used_at + 6 + 8 * queue_size
        ring_gpa = self.alloc(ring_len, align=PAGE, fill=0)
        self.ring_gpa = ring_gpa
        self.ring_iova = ring_iova
        self.map(ring_iova, ring_gpa, ring_len, RW)
        self.desc, self.avail, self.used = (ring_iova, ring_iova + desc_len,
                                            ring_iova + used_at)
        self._avail_at = ring_gpa + desc_len
        self._used_at = ring_gpa + used_at
        self.image = tmp / "disk.img"
        self.image.write_bytes(bytes(image_size))
        self.fd = os.open(self.image, os.O_RDWR)
        self.queue = hw.BlkQueue(SID)
        self.queue.set_backing(self.fd, image_size // 512, read_only, b"vblk-serial")
        self.queue.set_features(indirect, True, True)
        self.queue.set_ring(queue_size, self.desc, self.avail, self.used)
        assert self.queue.enable()
        self._free = 0
        self._avail_idx = 0
        self._used_seen = 0

    def close(self) -> None:
        os.close(self.fd)

    # --- memory and the DMA API ------------------------------------------------------------

    def alloc(self, size: int, align: int = 64, fill: int = 0xAA) -> int:
        gpa = (self._next_gpa + align - 1) & ~(align - 1)
        self._next_gpa = gpa + max(size, 1)
        self.write(gpa, bytes([fill]) * size)
        return gpa

    def write(self, gpa: int, data: bytes) -> None:
        self.ram[gpa - GPA_BASE:gpa - GPA_BASE + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.ram[gpa - GPA_BASE:gpa - GPA_BASE + size])

    def map(self, iova: int, gpa: int, size: int, flags: int) -> None:
        """MAP the pages holding [gpa, gpa+size) at the page of `iova`."""
        first, last = gpa & ~(PAGE - 1), (gpa + size - 1) | (PAGE - 1)
        self.table.add(Mapping(iova & ~(PAGE - 1), (iova & ~(PAGE - 1)) + last - first, first,
                               flags))

    def dma_map(self, gpa: int, size: int, flags: int) -> int:
        """dma_map_single: a fresh IOVA range, the page offset kept; returns the IOVA."""
        iova = self._next_iova + (gpa & (PAGE - 1))
        self.map(iova, gpa, size, flags)
        pages = ((gpa & (PAGE - 1)) + size + PAGE - 1) // PAGE
        self._next_iova += (pages + 1) * PAGE  # a guard page between ranges
        return iova

    def unmap(self, iova: int) -> None:
        m = self.table.lookup(iova)
        self.table.remove_range(m.virt_start, m.virt_end)

    # --- raw ring access ---------------------------------------------------------------------

    def set_desc(self, index: int, addr: int, length: int, flags: int, next_: int = 0,
                 table_gpa: int | None = None) -> None:
        base = self.ring_gpa if table_gpa is None else table_gpa
        self.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, next_))

    def publish(self, head: int) -> None:
        self.write(self._avail_at + 4 + 2 * (self._avail_idx % self.size),
                   struct.pack("<H", head))
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self._avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.write(self._avail_at + 2, struct.pack("<H", idx))

    def set_avail_flags(self, flags: int) -> None:
        self.write(self._avail_at, struct.pack("<H", flags))

    def used_flags(self) -> int:
        return struct.unpack("<H", self.read(self._used_at, 2))[0]

    def used_idx(self) -> int:
        return struct.unpack("<H", self.read(self._used_at + 2, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        while self._used_seen != self.used_idx():
            slot = self._used_at + 4 + 8 * (self._used_seen % self.size)
            out.append(struct.unpack("<II", self.read(slot, 8)))
            self._used_seen = (self._used_seen + 1) & 0xFFFF
        return out

    def kick(self) -> int:
        return self.queue.serve(self.engine)

    # --- requests, as Linux builds them ---------------------------------------------------------

    def request(self, type_: int, sector: int = 0, data: bytes = b"", in_len: int = 0,
                indirect: bool = False, segments: int = 1, header_gpa: int | None = None,
                status_gpa: int | None = None, data_flags: int | None = None,
                publish: bool = True) -> Request:
        """One request: header (readable), `data` (readable, OUT) or `in_len` writable
        bytes (IN, GET_ID) in `segments` pieces, the status byte; mapped like dma_map_*."""
        req = Request()
        req.header_gpa = header_gpa if header_gpa is not None else self.alloc(16, align=16)
        self.write(req.header_gpa, struct.pack("<IIQ", type_, 0, sector))
        req.header_iova = self.dma_map(req.header_gpa, 16, READ)
        segs = [(req.header_iova, 16, False)]
        length = len(data) or in_len
        if length:
            req.data_gpa = self.alloc(length, align=PAGE)
            if data:
                self.write(req.data_gpa, data)
            flags = data_flags if data_flags is not None else (READ if data else WRITE)
            req.data_iova = self.dma_map(req.data_gpa, length, flags)
            piece = -(-length // segments)
            for off in range(0, length, piece):
                segs.append((req.data_iova + off, min(piece, length - off), not data))
        req.status_gpa = status_gpa if status_gpa is not None else self.alloc(1, fill=0xEE)
        req.status_iova = self.dma_map(req.status_gpa, 1, WRITE)
        segs.append((req.status_iova, 1, True))
        req.head = self.add_chain(segs, indirect)
        if publish:
            self.publish(req.head)
        return req

    def add_chain(self, segs: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        head = self._free
        if indirect:
            table = self.alloc(16 * len(segs), align=16)
            for i, (addr, length, w) in enumerate(segs):
                last = i == len(segs) - 1
                self.set_desc(i, addr, length, (F_WRITE if w else 0) | (0 if last else F_NEXT),
                              i + 1, table_gpa=table)
            self.set_desc(head, self.dma_map(table, 16 * len(segs), READ), 16 * len(segs),
                          F_INDIRECT)
            self._free = (head + 1) % self.size
            return head
        for i, (addr, length, w) in enumerate(segs):
            index = (head + i) % self.size
            last = i == len(segs) - 1
            self.set_desc(index, addr, length, (F_WRITE if w else 0) | (0 if last else F_NEXT),
                          (index + 1) % self.size)
        self._free = (head + len(segs)) % self.size
        return head

    def status(self, req: Request) -> int:
        return self.read(req.status_gpa, 1)[0]


class Request:
    head: int = 0
    header_gpa: int = 0
    header_iova: int = 0
    data_gpa: int = 0
    data_iova: int = 0
    status_gpa: int = 0
    status_iova: int = 0


def pattern(sector: int, length: int, seed: int = 1) -> bytes:
    """Bytes that name their sector: a misplaced or stale block shows at once."""
    out = bytearray()
    for s in range(sector, sector + length // 512):
        out += struct.pack("<QQ", s, seed) * 32
    return bytes(out)
