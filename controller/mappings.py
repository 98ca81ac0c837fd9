"""A domain's mappings: non-overlapping inclusive IOVA ranges, with the spec's MAP/UNMAP rules.

A "mapping" is what one MAP request created; UNMAP removes whole mappings only (virtio spec
5.13.6.7: splitting one is refused with S_RANGE and nothing is removed).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Mapping:
    virt_start: int
    virt_end: int  # inclusive
    phys_start: int
    flags: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class OverlapError(ValueError):
    """MAP over an existing mapping."""


class SplitError(ValueError):
    """UNMAP would remove part of a mapping."""


class MappingTable:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: list[Mapping] = []

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self) -> Iterator[Mapping]:
        return iter(self._maps)

    def _first_ending_at_or_after(self, addr: int) -> int:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self._maps[i].virt_end >= addr:
            return i
        return i + 1

    def add(self, mapping: Mapping) -> None:
        i = self._first_ending_at_or_after(mapping.virt_start)
        if i < len(self._maps) and self._maps[i].virt_start <= mapping.virt_end:
            raise OverlapError(f"[{mapping.virt_start:#x}, {mapping.virt_end:#x}] overlaps "
                               f"[{self._maps[i].virt_start:#x}, {self._maps[i].virt_end:#x}]")
        self._starts.insert(i, mapping.virt_start)
        self._maps.insert(i, mapping)

    def remove_range(self, virt_start: int, virt_end: int) -> list[Mapping]:
        """Remove every mapping inside [virt_start, virt_end]; all or nothing."""
        lo = self._first_ending_at_or_after(virt_start)
        hi = lo
        while hi < len(self._maps) and self._maps[hi].virt_start <= virt_end:
            hi += 1
        affected = self._maps[lo:hi]
        for m in affected:
            if m.virt_start < virt_start or m.virt_end > virt_end:
                raise SplitError(f"[{virt_start:#x}, {virt_end:#x}] would split mapping "
                                 f"[{m.virt_start:#x}, {m.virt_end:#x}]")
        del self._maps[lo:hi]
        del self._starts[lo:hi]
        return affected

    def lookup(self, iova: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0 and self._maps[i].virt_end >= iova:
            return self._maps[i]
        return None

    def overlaps(self, virt_start: int, virt_end: int) -> bool:
        i = self._first_ending_at_or_after(virt_start)
        return i < len(self._maps) and self._maps[i].virt_start <= virt_end
