"""A minimal virtio driver over synthetic guest memory, for testing the data plane.

It lays out one split virtqueue (descriptor table, avail and used rings) in a bytearray that
the data plane sees as guest RAM, builds descriptor chains, publishes them and reads the used
ring back, the way Linux's virtio_ring does. Tests use its raw helpers to build malformed
chains too.
"""

from __future__ import annotations

import struct

from viommu._dataplane import GuestMemory, VirtQueue

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1

GPA_BASE = 0x4000_0000
UADDR_BASE = 0x7F00_0000_0000  # where the "front-end" has guest RAM mapped
DESC, AVAIL, USED, DATA = 0x1000, 0x2000, 0x3000, 0x10000


class FakeDriver:
    def __init__(self, queue_size: int = 16, mem_size: int = 1 << 20,
                 ram: bytearray | None = None, mem: GuestMemory | None = None) -> None:
        """Own guest RAM by default; or the rings live in `ram`, already mapped as `mem` at
        GPA_BASE/UADDR_BASE (to share RAM with tables a test builds; keep the first 512 KiB
        for the driver)."""
        self.ram = bytearray(mem_size) if ram is None else ram
        if mem is None:
            mem = GuestMemory()
            mem.add_region(GPA_BASE, mem_size, UADDR_BASE, self.ram)
        self.mem = mem
        self.size = queue_size
        self.vq = VirtQueue(self.mem, 0)
        self.vq.set_num(queue_size)
        self.vq.set_addr(UADDR_BASE + DESC, UADDR_BASE + AVAIL, UADDR_BASE + USED)
        self.vq.set_base(0)
        self.vq.start()
        self._avail_words = memoryview(self.ram).cast("H")  # little-endian hosts only
        self._next_data = DATA
        self._free_desc = 0
        self._avail_idx = 0
        self._used_seen = 0

    # --- memory ----------------------------------------------------------------------------

    def alloc(self, size: int, fill: int = 0xAA) -> int:
        """A guest-physical buffer, pre-filled so a test can see what the device wrote."""
        gpa = GPA_BASE + self._next_data
        self._next_data += (size + 63) & ~63
        self.write(gpa, bytes([fill]) * size)
        return gpa

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - GPA_BASE
        self.ram[off:off + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        off = gpa - GPA_BASE
        return bytes(self.ram[off:off + size])

    # --- raw ring access ---------------------------------------------------------------------

    def set_desc(self, index: int, addr: int, length: int, flags: int, next_: int = 0) -> None:
        struct.pack_into("<QIHH", self.ram, DESC + 16 * index, addr, length, flags, next_)

    def publish(self, head: int) -> None:
        struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * (self._avail_idx % self.size), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        # One 16-bit store, as a driver's: struct.pack_into zeroes its bytes before it
        # writes them, and a device thread polling the index would see that 0.
        self._avail_words[(AVAIL + 2) // 2] = self._avail_idx

    def set_avail_idx(self, idx: int) -> None:
        struct.pack_into("<H", self.ram, AVAIL + 2, idx)

    def set_avail_flags(self, flags: int) -> None:
        struct.pack_into("<H", self.ram, AVAIL, flags)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.ram, USED + 2)[0]

    def take_used(self) -> list[tuple[int, int]]:
        """(descriptor id, used length) entries the device added since the last call."""
        out = []
        while self._used_seen != self.used_idx():
            slot = USED + 4 + 8 * (self._used_seen % self.size)
            out.append(struct.unpack_from("<II", self.ram, slot))
            self._used_seen = (self._used_seen + 1) & 0xFFFF
        return out

    # --- chains ----------------------------------------------------------------------------------

    def add_chain(self, segments: list[tuple[int, int, bool]]) -> int:
        """Descriptors for (gpa, length, device_writable) segments; returns the head."""
        head = self._free_desc
        for i, (gpa, length, writable) in enumerate(segments):
            index = (head + i) % self.size
            last = i == len(segments) - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.set_desc(index, gpa, length, flags, (index + 1) % self.size)
        self._free_desc = (head + len(segments)) % self.size
        return head

    def post(self, readable: bytes, writable_len: int) -> tuple[int, int]:
        """Post a request as Linux does (one readable, one writable descriptor);
        returns (head, gpa of the writable buffer)."""
        segments = []
        if readable:
            rgpa = self.alloc(len(readable))
            self.write(rgpa, readable)
            segments.append((rgpa, len(readable), False))
        wgpa = self.alloc(writable_len) if writable_len else 0
        if writable_len:
            segments.append((wgpa, writable_len, True))
        head = self.add_chain(segments)
        self.publish(head)
        return head, wgpa
