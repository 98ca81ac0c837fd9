"""The client's DMA memory: the regions a vfio-user client mapped with DMA_MAP, by DMA address.

QEMU without a vIOMMU in front of the device maps all of guest RAM, DMA address =
guest-physical address, each region with an fd (the shared memory backend) that is mmapped
here. A region without an fd could only be reached with DMA_READ/DMA_WRITE messages, which
this server does not send: an access to one is refused like an access to no region at all.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import logging
import mmap
from collections.abc import Iterator

from viommu.transport.vfio_user.messages import (
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_USER_DEF_PGSIZE,
    ProtocolError,
)

log = logging.getLogger(__name__)

PAGE_SIZE = VFIO_USER_DEF_PGSIZE


class DmaAccessError(Exception):
    """An access the client's memory does not allow; `address` is the first refused byte."""

    def __init__(self, address: int, write: bool, reason: str, mapped: bool) -> None:
        super().__init__(f"{'write' if write else 'read'} at {address:#x}: {reason}")
        self.address = address
        self.write = write
        self.mapped = mapped  # a region covers the address but forbids the access


@dataclasses.dataclass
class DmaRegion:
    address: int
    size: int
    flags: int
    offset: int
    mapping: mmap.mmap | None  # None: no fd was passed

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def readable(self) -> bool:
        return bool(self.flags & VFIO_DMA_MAP_FLAG_READ) and self.mapping is not None

    @property
    def writable(self) -> bool:
        return bool(self.flags & VFIO_DMA_MAP_FLAG_WRITE) and self.mapping is not None


class DmaMemory:
    """Non-overlapping regions sorted by address; reads and writes may span regions."""

    def __init__(self, max_regions: int) -> None:
        self.max_regions = max_regions
        self._regions: list[DmaRegion] = []
        self._starts: list[int] = []

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[DmaRegion]:
        return iter(list(self._regions))

    def add(self, address: int, size: int, flags: int, fd: int | None, offset: int) -> DmaRegion:
        """mmap `size` bytes of `fd` at `offset` (the caller keeps and closes the fd)."""
        self._check_new(address, size, fd, offset)
        mapping = None
        if fd is not None:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if flags & VFIO_DMA_MAP_FLAG_WRITE else 0)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
        region = DmaRegion(address, size, flags, offset, mapping)
        i = bisect.bisect(self._starts, address)
        self._regions.insert(i, region)
        self._starts.insert(i, address)
        return region

    def _check_new(self, address: int, size: int, fd: int | None, offset: int) -> None:
        if size == 0 or address + size > 1 << 64:
            raise ProtocolError(f"DMA region [{address:#x}, +{size:#x}) is empty or wraps")
        if (address | size | (offset if fd is not None else 0)) % PAGE_SIZE:
            raise ProtocolError(f"DMA region [{address:#x}, +{size:#x}) offset {offset:#x} is "
                                f"not {PAGE_SIZE}-byte aligned (pgsizes={PAGE_SIZE})")
        if len(self._regions) >= self.max_regions:
            raise ProtocolError(f"already {len(self._regions)} DMA regions, the max_dma_maps "
                                f"this server offered", errno.ENOSPC)
        for region in self._overlapping(address, address + size):
            raise ProtocolError(f"DMA region [{address:#x}, +{size:#x}) overlaps "
                                f"[{region.address:#x}, +{region.size:#x})", errno.EEXIST)

    def remove(self, address: int, size: int) -> list[DmaRegion]:
        """Unmap the regions inside [address, address+size); one only partly inside is an
        error (DMA_UNMAP must name whole mappings)."""
        end = address + size
        hit = list(self._overlapping(address, end))
        for region in hit:
            if region.address < address or region.end > end:
                raise ProtocolError(f"DMA_UNMAP [{address:#x}, +{size:#x}) cuts through region "
                                    f"[{region.address:#x}, +{region.size:#x})")
        if not hit:
            raise ProtocolError(f"DMA_UNMAP [{address:#x}, +{size:#x}): nothing is mapped "
                                f"there", errno.ENOENT)
        for region in hit:
            self._drop(region)
        return hit

    def clear(self) -> None:
        for region in list(self._regions):
            self._drop(region)

    def _drop(self, region: DmaRegion) -> None:
        i = self._regions.index(region)
        del self._regions[i]
        del self._starts[i]
        if region.mapping is not None:
            region.mapping.close()

    def _overlapping(self, start: int, end: int) -> Iterator[DmaRegion]:
        i = max(bisect.bisect(self._starts, start) - 1, 0)
        for region in self._regions[i:]:
            if region.address >= end:
                break
            if region.end > start:
                yield region

    def find(self, address: int) -> DmaRegion | None:
        i = bisect.bisect(self._starts, address) - 1
        if i >= 0 and self._regions[i].address <= address < self._regions[i].end:
            return self._regions[i]
        return None

    # --- access ----------------------------------------------------------------------------

    def read(self, address: int, length: int) -> bytes:
        chunks = []
        for region, start, n in self._pieces(address, length, write=False):
            chunks.append(region.mapping[region_offset(region, start):
                                         region_offset(region, start) + n])
        return b"".join(chunks)

    def write(self, address: int, data: bytes) -> None:
        """All-or-nothing: every piece is checked before the first byte lands."""
        done = 0
        for region, start, n in list(self._pieces(address, len(data), write=True)):
            off = region_offset(region, start)
            region.mapping[off:off + n] = data[done:done + n]
            done += n

    def _pieces(self, address: int, length: int, write: bool) -> Iterator[tuple]:
        """(region, address, length) pieces covering the access; DmaAccessError at the
        first byte no region allows."""
        pos, end = address, address + length
        while pos < end:
            region = self.find(pos)
            if region is None:
                raise DmaAccessError(pos, write, "no DMA region maps this address", False)
            if not (region.writable if write else region.readable):
                why = ("the region has no fd (DMA_READ/WRITE only)" if region.mapping is None
                       else f"the region is mapped without {'WRITE' if write else 'READ'}")
                raise DmaAccessError(pos, write, why, True)
            n = min(end, region.end) - pos
            yield region, pos, n
            pos += n


def region_offset(region: DmaRegion, address: int) -> int:
    return address - region.address
