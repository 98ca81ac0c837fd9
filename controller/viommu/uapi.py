"""virtio-iommu constants (virtio spec 5.13, Linux include/uapi/linux/virtio_iommu.h).

Each constant is named as the spec names it and defined here once; the request types live
in the data plane (ext/) because the request parser needs them, and are re-exported here.
"""

from __future__ import annotations

import enum

from viommu._dataplane import RequestType

__all__ = [
    "RequestType", "Status", "Feature", "VIRTIO_F_VERSION_1", "VHOST_USER_F_PROTOCOL_FEATURES",
    "VIRTIO_IOMMU_ATTACH_F_BYPASS", "MapFlag", "FaultReason", "FaultFlag", "ProbeProperty",
    "ResvMemSubtype", "CONFIG_SIZE", "FAULT_RECORD_SIZE", "PROBE_PROPERTY_HEADER_SIZE",
    "RESV_MEM_PROPERTY_SIZE", "MSI_WINDOW_X86", "VIOMMU_F_ATTACH_TABLE", "TableFormat",
    "InvalidateScope", "InvalidateCache", "InvalidateFlag", "VIOMMU_F_PAGE_REQUEST",
    "ExtFaultFlag", "PageRespCode", "PAGE_RESP_F_PASID_VALID",
    "EXT_FAULT_RECORD_SIZE",
]


class Status(enum.IntEnum):
    """Request tail status (VIRTIO_IOMMU_S_*)."""

    S_OK = 0
    S_IOERR = 1
    S_UNSUPP = 2
    S_DEVERR = 3
    S_INVAL = 4
    S_RANGE = 5
    S_NOENT = 6
    S_FAULT = 7
    S_NOMEM = 8


class Feature(enum.IntEnum):
    """Device feature bit numbers (VIRTIO_IOMMU_F_*)."""

    F_INPUT_RANGE = 0
    F_DOMAIN_RANGE = 1
    F_MAP_UNMAP = 2
    F_BYPASS = 3
    F_PROBE = 4
    F_MMIO = 5
    F_BYPASS_CONFIG = 6


VIRTIO_F_VERSION_1 = 32
# vhost-user's protocol-features bit travels in the same feature word (vhost-user.rst).
VHOST_USER_F_PROTOCOL_FEATURES = 30

VIRTIO_IOMMU_ATTACH_F_BYPASS = 1 << 0


class MapFlag(enum.IntFlag):
    """VIRTIO_IOMMU_MAP_F_*."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMIO = 1 << 2


class FaultReason(enum.IntEnum):
    """VIRTIO_IOMMU_FAULT_R_*."""

    UNKNOWN = 0
    DOMAIN = 1
    MAPPING = 2


class FaultFlag(enum.IntFlag):
    """VIRTIO_IOMMU_FAULT_F_*; EXEC is Linux's addition, not in the spec."""

    READ = 1 << 0
    WRITE = 1 << 1
    EXEC = 1 << 2
    ADDRESS = 1 << 8


class ProbeProperty(enum.IntEnum):
    """VIRTIO_IOMMU_PROBE_T_*."""

    NONE = 0
    RESV_MEM = 1


class ResvMemSubtype(enum.IntEnum):
    """VIRTIO_IOMMU_RESV_MEM_T_*."""

    RESERVED = 0
    MSI = 1


# --- Page-table extension (digest §B.4, the unmerged "DX" draft) -----------------------------
# The drafts' feature numbers collide with each other and with the spec's own bits, so this
# one is viommu's: bit 63 lies in the device-specific range (50-127) and far from any draft.
VIOMMU_F_ATTACH_TABLE = 63


# Recoverable faults for guests that can answer them (digest §B.3, with the maintainer's
# review applied): an extended fault record carrying PASID and group ID, and PAGE_RESP.
VIOMMU_F_PAGE_REQUEST = 62


class ExtFaultFlag(enum.IntFlag):
    """Flags of the extended fault record, beside FaultFlag's."""

    PASID = 1 << 9  # `pasid` (offset 12) is valid
    PAGE_REQUEST = 1 << 10  # a page request: answer it with PAGE_RESP
    LAST = 1 << 11  # last request of its group (the one PAGE_RESP answers)
    PRIV = 1 << 12  # privileged access requested


class PageRespCode(enum.IntEnum):
    """PAGE_RESP `code` (R21 numbering)."""

    SUCCESS = 0
    INVALID = 1
    FAILURE = 2


PAGE_RESP_F_PASID_VALID = 1 << 0
EXT_FAULT_RECORD_SIZE = 32


class TableFormat(enum.IntEnum):
    """ATTACH_TABLE `format` (VIRTIO_IOMMU_FORMAT_*)."""

    ARM_SMMU3 = 1


class InvalidateScope(enum.IntEnum):
    """INVALIDATE `scope` (VIRTIO_IOMMU_INVAL_S_*)."""

    DOMAIN = 1
    PASID = 2
    ADDRESS = 3


class InvalidateCache(enum.IntFlag):
    """INVALIDATE `caches` (VIRTIO_IOMMU_INVAL_C_*)."""

    PASID = 1 << 0  # configuration: context descriptors
    TLB = 1 << 1


class InvalidateFlag(enum.IntFlag):
    """INVALIDATE `flags` (VIRTIO_IOMMU_INVAL_F_*)."""

    LEAF = 1 << 0
    PASID = 1 << 1
    ID = 1 << 2
    GLOBAL = 1 << 3


CONFIG_SIZE = 40
FAULT_RECORD_SIZE = 24
PROBE_PROPERTY_HEADER_SIZE = 4
RESV_MEM_PROPERTY_SIZE = 24
# x86 MSI doorbell window (the LAPIC range), reported as RESV_MEM_T_MSI in PROBE.
MSI_WINDOW_X86 = (0xFEE0_0000, 0xFEEF_FFFF)
