"""A domain's mappings: non-overlapping inclusive IOVA ranges, with the spec's MAP/UNMAP rules.

A "mapping" is what one MAP request created; UNMAP removes whole mappings only (virtio spec
5.13.6, "UNMAP request": splitting one is refused with S_RANGE and nothing is removed).

The table itself is the data plane's C-array `MappingTable` (ext/mappings.pxi), so the
translation engine reads it without Python objects; it hands out and accepts the `Mapping`
values below, and raises the errors below. The statuses of MAP and UNMAP come from the
data plane's `MapRules` (the same code the request thread runs).
"""

from __future__ import annotations

import dataclasses

from viommu._dataplane import MappingTable

__all__ = ["Mapping", "MappingTable", "OverlapError", "SplitError"]


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
