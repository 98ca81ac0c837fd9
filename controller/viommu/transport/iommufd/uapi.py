"""The iommufd uAPI records a VMM reads and writes on a fault fd and a vEVENTQ fd, as Linux
include/uapi/linux/iommufd.h lays them out: the ioctl numbers, the flag and code enums,
and `struct iommu_hwpt_pgfault`, `struct iommu_hwpt_page_response` and
`struct iommufd_vevent_header` with their encoders and decoders. How the records flow
(whole groups, sequence numbers, lost events) is in the package docstring; the readers
are in `queues`.
"""

from __future__ import annotations

import dataclasses
import struct

from viommu.events.page_requests import PageRequest
from viommu.events.smmuv3 import EVENT_RECORD_SIZE

# ioctl numbers: _IO(IOMMUFD_TYPE, IOMMUFD_CMD_*), no size or direction bits.
IOMMUFD_TYPE = ord(";")
IOMMUFD_CMD_HWPT_ALLOC = 0x89
IOMMUFD_CMD_FAULT_QUEUE_ALLOC = 0x8E
IOMMUFD_CMD_VIOMMU_ALLOC = 0x90
IOMMUFD_CMD_VDEVICE_ALLOC = 0x91
IOMMUFD_CMD_VEVENTQ_ALLOC = 0x93


def _io(cmd: int) -> int:
    return IOMMUFD_TYPE << 8 | cmd


IOMMU_HWPT_ALLOC = _io(IOMMUFD_CMD_HWPT_ALLOC)
IOMMU_FAULT_QUEUE_ALLOC = _io(IOMMUFD_CMD_FAULT_QUEUE_ALLOC)
IOMMU_VIOMMU_ALLOC = _io(IOMMUFD_CMD_VIOMMU_ALLOC)
IOMMU_VDEVICE_ALLOC = _io(IOMMUFD_CMD_VDEVICE_ALLOC)
IOMMU_VEVENTQ_ALLOC = _io(IOMMUFD_CMD_VEVENTQ_ALLOC)
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
IOMMU_VIOMMU_TYPE_ARM_SMMUV3 = 1

# enum iommu_hwpt_pgfault_flags / _perm
IOMMU_PGFAULT_FLAGS_PASID_VALID = 1 << 0
IOMMU_PGFAULT_FLAGS_LAST_PAGE = 1 << 1
IOMMU_PGFAULT_PERM_READ = 1 << 0
IOMMU_PGFAULT_PERM_WRITE = 1 << 1
IOMMU_PGFAULT_PERM_EXEC = 1 << 2  # PASID TLP prefix: Execute Requested
IOMMU_PGFAULT_PERM_PRIV = 1 << 3  # PASID TLP prefix: Privileged Mode Requested

# enum iommufd_page_response_code. FAILURE was removed from the uAPI: see FaultQueue.respond.
IOMMUFD_PAGE_RESP_SUCCESS = 0
IOMMUFD_PAGE_RESP_INVALID = 1

# enum iommu_veventq_flag / iommu_veventq_type
IOMMU_VEVENTQ_FLAG_LOST_EVENTS = 1 << 0
IOMMU_VEVENTQ_TYPE_ARM_SMMUV3 = 1

# flags, dev_id, pasid, grpid, perm, __reserved, addr (aligned_u64), length, cookie
HWPT_PGFAULT = struct.Struct("<6IQII")
HWPT_PAGE_RESPONSE = struct.Struct("<II")  # cookie, code
VEVENT_HEADER = struct.Struct("<II")  # flags, sequence
VEVENT_ARM_SMMUV3_SIZE = EVENT_RECORD_SIZE  # struct iommu_vevent_arm_smmuv3 { le64 evt[4] }
VEVENT_SEQUENCE_MAX = (1 << 31) - 1  # the kernel's INT_MAX: sequence = (sequence + 1) & INT_MAX

PAGE_MASK = ~0xFFF


@dataclasses.dataclass(frozen=True)
class HwptPgfault:
    """struct iommu_hwpt_pgfault (40 bytes), read from the fault fd."""

    flags: int
    dev_id: int  # iommufd device object ID, not the endpoint: map it
    pasid: int  # meaningful only with PASID_VALID
    grpid: int  # Page Request Group Index
    perm: int
    addr: int  # page address for PRI; the exact IOVA for an SMMU stall
    length: int = 0  # prefetch hint; the kernel writes 0
    cookie: int = 0  # the group's cookie, echoed in the response

    def encode(self) -> bytes:
        return HWPT_PGFAULT.pack(self.flags, self.dev_id, self.pasid, self.grpid, self.perm, 0,
                                 self.addr, self.length, self.cookie)

    @classmethod
    def decode(cls, raw: bytes) -> HwptPgfault:
        if len(raw) != HWPT_PGFAULT.size:
            raise ValueError(f"struct iommu_hwpt_pgfault is {HWPT_PGFAULT.size} bytes, "
                             f"got {len(raw)}")
        flags, dev_id, pasid, grpid, perm, _reserved, addr, length, cookie = (
            HWPT_PGFAULT.unpack(raw))
        return cls(flags, dev_id, pasid, grpid, perm, addr, length, cookie)

    @property
    def last_page(self) -> bool:
        return bool(self.flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE)

    def to_page_request(self, sid: int) -> PageRequest:
        """The request as PRI states it; ValueError when it cannot be (e.g. an SMMU stall tag
        wider than the 9-bit group index). The address is reduced to its page."""
        return PageRequest(
            sid=sid, grpid=self.grpid, address=self.addr & PAGE_MASK, last=self.last_page,
            read=bool(self.perm & IOMMU_PGFAULT_PERM_READ),
            write=bool(self.perm & IOMMU_PGFAULT_PERM_WRITE),
            exec=bool(self.perm & IOMMU_PGFAULT_PERM_EXEC),
            priv=bool(self.perm & IOMMU_PGFAULT_PERM_PRIV),
            pasid=self.pasid if self.flags & IOMMU_PGFAULT_FLAGS_PASID_VALID else None)


@dataclasses.dataclass(frozen=True)
class HwptPageResponse:
    """struct iommu_hwpt_page_response (8 bytes), written to the fault fd."""

    cookie: int
    code: int

    def encode(self) -> bytes:
        return HWPT_PAGE_RESPONSE.pack(self.cookie, self.code)

    @classmethod
    def decode(cls, raw: bytes) -> HwptPageResponse:
        if len(raw) != HWPT_PAGE_RESPONSE.size:
            raise ValueError(f"struct iommu_hwpt_page_response is {HWPT_PAGE_RESPONSE.size} "
                             f"bytes, got {len(raw)}")
        return cls(*HWPT_PAGE_RESPONSE.unpack(raw))


@dataclasses.dataclass(frozen=True)
class VeventHeader:
    """struct iommufd_vevent_header (8 bytes); an SMMUv3 payload follows unless LOST_EVENTS."""

    flags: int
    sequence: int

    def encode(self) -> bytes:
        return VEVENT_HEADER.pack(self.flags, self.sequence)

    @classmethod
    def decode(cls, raw: bytes) -> VeventHeader:
        if len(raw) != VEVENT_HEADER.size:
            raise ValueError(f"struct iommufd_vevent_header is {VEVENT_HEADER.size} bytes, "
                             f"got {len(raw)}")
        return cls(*VEVENT_HEADER.unpack(raw))

    @property
    def lost_events(self) -> bool:
        return bool(self.flags & IOMMU_VEVENTQ_FLAG_LOST_EVENTS)

