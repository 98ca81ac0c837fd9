"""Page requests (PCIe PRI, PCIe 6.x §10.4) as the backend sees them, whatever their source:
our DMA endpoint, an injected request, or an iommufd fault queue on a real host.

A page request group (PRG) is one or more requests with the same group index from one
function (and PASID); only the last carries L=1, and only it gets a PRG Response, one per
group. A Stop Marker is a request with L=1 and R=W=0: it needs no response and is no fault.
"""

from __future__ import annotations

import dataclasses
import enum


class ResponseCode(enum.IntEnum):
    """PRG Response Code, as on the wire (PCIe; Intel QI_RESP_*, AMD PPR_*)."""

    SUCCESS = 0x0  # pages made resident: the function retries
    INVALID_REQUEST = 0x1  # cannot be satisfied: the access fails, no retry
    RESPONSE_FAILURE = 0xF  # catastrophic: the function disables its PRI


PRG_INDEX_BITS = 9
PASID_BITS = 20


@dataclasses.dataclass(frozen=True)
class PageRequest:
    sid: int  # requester = virtio-iommu endpoint ID
    grpid: int  # Page Request Group Index
    address: int  # page address (bits 63:12)
    last: bool  # L: last request of the group
    read: bool
    write: bool
    exec: bool = False  # PASID Execute Requested
    priv: bool = False  # PASID Privileged Mode Requested
    pasid: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.grpid < 1 << PRG_INDEX_BITS:
            raise ValueError(f"group index {self.grpid} does not fit {PRG_INDEX_BITS} bits")
        if self.pasid is not None and not 0 <= self.pasid < 1 << PASID_BITS:
            raise ValueError(f"PASID {self.pasid} does not fit {PASID_BITS} bits")
        if self.address & 0xFFF or not 0 <= self.address < 1 << 64:
            raise ValueError(f"page address {self.address:#x} is not a 4 KiB page address")

    @property
    def is_stop_marker(self) -> bool:
        return self.last and not self.read and not self.write

    @property
    def group_key(self) -> tuple[int, int | None, int]:
        """Requests of one group share requester, PASID and group index."""
        return self.sid, self.pasid, self.grpid

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
