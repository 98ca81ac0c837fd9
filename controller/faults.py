"""virtio-iommu fault records (virtio spec 5.13.6.9) and the SMMUv3 → virtio-iommu mapping.

The mapping is the one in the design digest (§G): translation-class events become MAPPING
faults with the input address, F_STREAM_DISABLED becomes a DOMAIN fault, configuration
errors become UNKNOWN faults without an address. Host-side problems (bad StreamID, STE/VMS
fetch, TLB/config conflicts) are not the guest's business and are not forwarded.
"""

from __future__ import annotations

import dataclasses
import struct

from viommu.smmuv3 import ADDRESS_EVENTS, EventId, EventRecord
from viommu.spec import FAULT_RECORD_SIZE, FaultFlag, FaultReason

_FAULT = struct.Struct("<B3xIII Q")
assert _FAULT.size == FAULT_RECORD_SIZE

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

    def encode(self) -> bytes:
        return _FAULT.pack(self.reason, self.flags, self.endpoint, 0, self.address)

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

