"""virtio-iommu fault records (virtio spec 5.13.6, "Fault reporting") and viommu's SMMUv3 →
virtio-iommu mapping.

Translation-class events become MAPPING faults with the input address, F_STREAM_DISABLED
becomes a DOMAIN fault, configuration errors become UNKNOWN faults without an address. An
E_PAGE_REQUEST (a page request hint) becomes a MAPPING fault with its page address and the
accesses it anticipates, as a PCIe page request does.
Host-side problems (bad StreamID, STE/VMS fetch, TLB/config conflicts) are not the guest's
business and are not forwarded.
"""

from __future__ import annotations

import dataclasses

from viommu import _dataplane as hw
from viommu.events.page_requests import PageRequest
from viommu.events.smmuv3 import (
    ADDRESS_EVENTS,
    PAGE_HINT_EXEC,
    PAGE_HINT_PRIVILEGED,
    PAGE_HINT_READ,
    PAGE_HINT_WRITE,
    EventId,
    EventRecord,
)
from viommu.uapi import ExtFaultFlag, FaultFlag, FaultReason

_MAPPING_EVENTS = frozenset({
    EventId.F_TRANSLATION, EventId.F_PERMISSION, EventId.F_ACCESS, EventId.F_ADDR_SIZE,
})
# Flags only viommu's extended record carries (plain ints: this runs for every event).
_EXTENDED_ONLY = int(ExtFaultFlag.PASID | ExtFaultFlag.PAGE_REQUEST | ExtFaultFlag.LAST
                     | ExtFaultFlag.PRIV)
_ADDRESS, _READ, _WRITE, _EXEC = (int(FaultFlag.ADDRESS), int(FaultFlag.READ),
                                  int(FaultFlag.WRITE), int(FaultFlag.EXEC))
HOST_ONLY_EVENTS = frozenset({
    EventId.C_BAD_STREAMID, EventId.F_STE_FETCH, EventId.F_VMS_FETCH,
    EventId.F_TLB_CONFLICT, EventId.F_CFG_CONFLICT,
})


class NotForwarded(ValueError):
    """The event is a host-side problem with no meaning for the guest."""


@dataclasses.dataclass(frozen=True)
class FaultRecord:
    """struct virtio_iommu_fault, reserved fields written as zero (packed by the data
    plane, from ext/uapi/virtio_iommu.pxd)."""

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
            flags = self.flags & ~_EXTENDED_ONLY
            return hw.encode_fault_record(self.reason, flags, self.endpoint, self.address)
        flags = self.flags | (ExtFaultFlag.PASID if self.pasid is not None else 0)
        return hw.encode_ext_fault_record(self.reason, flags, self.endpoint, self.pasid or 0,
                                          self.address, self.grpid)

    @classmethod
    def decode(cls, raw: bytes) -> FaultRecord:
        return cls(*hw.decode_fault_record(raw))

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
    """A page request as a MAPPING fault with its address and access."""
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
    if event_id == EventId.E_PAGE_REQUEST:
        return _fault_from_page_hint(event)
    reason = FaultReason.MAPPING if event_id in _MAPPING_EVENTS else FaultReason.UNKNOWN
    if event_id not in ADDRESS_EVENTS:
        return FaultRecord(reason, 0, event.sid)
    flags = _ADDRESS | (_READ if event.rnw else _WRITE) | (_EXEC if event.ind else 0)
    return FaultRecord(reason, flags, event.sid, event.address)



def _fault_from_page_hint(event: EventRecord) -> FaultRecord:
    """An E_PAGE_REQUEST as a MAPPING fault at its page address, with the accesses it
    anticipates (the privileged ones marked PRIV in the extended record)."""
    hints = event.page_hints
    flags = int(FaultFlag.ADDRESS)
    flags |= FaultFlag.READ if hints & PAGE_HINT_READ else 0
    flags |= FaultFlag.WRITE if hints & PAGE_HINT_WRITE else 0
    flags |= FaultFlag.EXEC if hints & PAGE_HINT_EXEC else 0
    flags |= ExtFaultFlag.PRIV if hints & PAGE_HINT_PRIVILEGED else 0
    return FaultRecord(FaultReason.MAPPING, int(flags), event.sid, event.address,
                       event.ssid if event.ssv else None)
