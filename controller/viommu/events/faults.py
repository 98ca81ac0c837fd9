"""virtio-iommu fault records (virtio spec 5.13.6.9) and the SMMUv3 → virtio-iommu mapping.

The mapping is the one in the design digest (§G): translation-class events become MAPPING
faults with the input address, F_STREAM_DISABLED becomes a DOMAIN fault, configuration
errors become UNKNOWN faults without an address. Host-side problems (bad StreamID, STE/VMS
fetch, TLB/config conflicts) are not the guest's business and are not forwarded.
"""

from __future__ import annotations

import dataclasses
import struct

from viommu.events.page_requests import PageRequest
from viommu.events.smmuv3 import ADDRESS_EVENTS, EventId, EventRecord
from viommu.uapi import (
    EXT_FAULT_RECORD_SIZE,
    FAULT_RECORD_SIZE,
    ExtFaultFlag,
    FaultFlag,
    FaultReason,
)

_FAULT = struct.Struct("<B3xIII Q")
assert _FAULT.size == FAULT_RECORD_SIZE
# Extended record: the PASID in reserved1 (offset 12), then the group ID (PRG index).
_FAULT_EXT = struct.Struct("<B3xIIIQH6x")
assert _FAULT_EXT.size == EXT_FAULT_RECORD_SIZE

_MAPPING_EVENTS = frozenset({
    EventId.F_TRANSLATION, EventId.F_PERMISSION, EventId.F_ACCESS, EventId.F_ADDR_SIZE,
    EventId.E_PAGE_REQUEST,
})
HOST_ONLY_EVENTS = frozenset({
    EventId.C_BAD_STREAMID, EventId.F_STE_FETCH, EventId.F_VMS_FETCH,
    EventId.F_TLB_CONFLICT, EventId.F_CFG_CONFLICT,
})


class NotForwarded(ValueError):
    """The event is a host-side problem with no meaning for the guest."""


@dataclasses.dataclass(frozen=True)
class FaultRecord:
    """struct virtio_iommu_fault: 24 bytes, reserved fields written as zero."""

    reason: int
    flags: int
    endpoint: int
    address: int = 0
    pasid: int | None = None  # extended record only
    grpid: int = 0  # extended record only: the page request's group index

    def encode(self, extended: bool = False) -> bytes:
        """The 24-byte record every driver reads, or viommu's 32-byte extended one for
        drivers that negotiated VIOMMU_F_PAGE_REQUEST (PASID and group ID kept)."""
        if not extended:
            flags = self.flags & ~int(ExtFaultFlag.PASID | ExtFaultFlag.PAGE_REQUEST
                                      | ExtFaultFlag.LAST | ExtFaultFlag.PRIV)
            return _FAULT.pack(self.reason, flags, self.endpoint, 0, self.address)
        flags = self.flags | (ExtFaultFlag.PASID if self.pasid is not None else 0)
        return _FAULT_EXT.pack(self.reason, int(flags), self.endpoint, self.pasid or 0,
                               self.address, self.grpid)

    @classmethod
    def decode(cls, raw: bytes) -> FaultRecord:
        if len(raw) != FAULT_RECORD_SIZE:
            raise ValueError(f"a fault record is {FAULT_RECORD_SIZE} bytes, got {len(raw)}")
        reason, flags, endpoint, _reserved1, address = _FAULT.unpack(raw)
        return cls(reason, flags, endpoint, address)

    def guest_line(self) -> str:
        """The line Linux's virtio-iommu driver prints for this record (without the
        `virtio_iommu virtioN: ` prefix): viommu_fault_handler's format."""
        reason = {FaultReason.DOMAIN: "domain", FaultReason.MAPPING: "page"}.get(
            self.reason, "unknown")
        if not self.flags & FaultFlag.ADDRESS:
            return f"{reason} fault from EP {self.endpoint}"
        perms = "".join(letter for flag, letter in (
            (FaultFlag.READ, "R"), (FaultFlag.WRITE, "W"), (FaultFlag.EXEC, "X"))
            if self.flags & flag)
        return f"{reason} fault from EP {self.endpoint} at {self.address:#x} [{perms}]"


def fault_from_page_request(req: PageRequest) -> FaultRecord:
    """A page request as a MAPPING fault with its address and access (digest §G)."""
    flags = int(FaultFlag.ADDRESS | ExtFaultFlag.PAGE_REQUEST)
    flags |= (FaultFlag.READ if req.read else 0) | (FaultFlag.WRITE if req.write else 0)
    flags |= (FaultFlag.EXEC if req.exec else 0) | (ExtFaultFlag.LAST if req.last else 0)
    flags |= ExtFaultFlag.PRIV if req.priv else 0
    return FaultRecord(FaultReason.MAPPING, flags, req.sid, req.address, req.pasid, req.grpid)


def fault_from_event(event: EventRecord) -> FaultRecord:
    """Convert an SMMUv3 event (SID = virtio-iommu endpoint ID) to a fault record."""
    try:
        event_id = EventId(event.event_id)
    except ValueError:
        event_id = None
    if event_id in HOST_ONLY_EVENTS:
        raise NotForwarded(f"{event_id.name} is a host-side error; it is logged, not forwarded")
    if event_id == EventId.F_STREAM_DISABLED:
        return FaultRecord(FaultReason.DOMAIN, 0, event.sid)
    reason = FaultReason.MAPPING if event_id in _MAPPING_EVENTS else FaultReason.UNKNOWN
    if event_id not in ADDRESS_EVENTS:
        return FaultRecord(reason, 0, event.sid)
    flags = FaultFlag.ADDRESS | (FaultFlag.READ if event.rnw else FaultFlag.WRITE)
    if event.ind:
        flags |= FaultFlag.EXEC
    return FaultRecord(reason, int(flags), event.sid, event.address)

