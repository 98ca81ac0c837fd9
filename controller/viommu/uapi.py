"""Spec constants for Python: virtio-iommu (virtio spec 5.13, Linux
include/uapi/linux/virtio_iommu.h), and the virtio transport, virtio PCI and virtio-blk ones
the block endpoint uses (spec 2.1, 4.1, 5.2; Linux virtio_config.h, virtio_pci.h,
virtio_blk.h).

Every value is defined once, in the data plane's headers ext/uapi/*.pxd (named as Linux
names it: VIRTIO_IOMMU_S_OK, VIRTIO_IOMMU_MAP_F_READ, ...), which the extension
viommu._dataplane exports. This module is its Python face: each enum here is built from the
extension's enum of the same name, with the common prefix dropped from member names
(Status.S_OK, MapFlag.READ, Feature.F_MAP_UNMAP; RequestType keeps its full names), as a
plain `enum.IntEnum`, or `enum.IntFlag` for bit flags. The extension's own enums accept any
value (an unknown one gets a nameless pseudo-member) and do not combine as flags, so Python
code uses these. Sizes are the headers' `sizeof`s.

Defined here, because nothing in C uses them: vhost-user's feature bit, and the x86 MSI
window.
"""

from __future__ import annotations

import enum

from viommu import _dataplane as hw

__all__ = [
    "RequestType", "Status", "Feature", "VIRTIO_F_VERSION_1", "VHOST_USER_F_PROTOCOL_FEATURES",
    "VIRTIO_IOMMU_ATTACH_F_BYPASS", "MapFlag", "FaultReason", "FaultFlag", "ProbeProperty",
    "ResvMemSubtype", "CONFIG_SIZE", "FAULT_RECORD_SIZE", "PROBE_PROPERTY_HEADER_SIZE",
    "RESV_MEM_PROPERTY_SIZE", "MSI_WINDOW_X86", "VIOMMU_F_ATTACH_TABLE", "TableFormat",
    "InvalidateScope", "InvalidateCache", "InvalidateFlag", "VIOMMU_F_PAGE_REQUEST",
    "ExtFaultFlag", "PageRespCode", "PAGE_RESP_F_PASID_VALID",
    "EXT_FAULT_RECORD_SIZE", "VIRTIO_ID_IOMMU", "NUM_QUEUES", "python_enum",
    "DeviceStatus", "TransportFeature", "RingFeature", "VIRTIO_F_ACCESS_PLATFORM",
    "VirtioPciCapType", "CommonCfg", "BlkFeature", "BlkRequestType", "BlkStatus",
]


def python_enum(c_enum: type, prefix: str = "", kind: type[enum.IntEnum] = enum.IntEnum,
                doc: str = "", module: str = __name__) -> type:
    """The Python enum for one of the extension's `cpdef enum`s: the same values, member
    names without `prefix`. `kind` may be IntFlag, or an IntEnum subclass that adds methods."""
    members = {member.name.removeprefix(prefix): int(member) for member in c_enum}
    made = kind(c_enum.__name__, members, module=module)
    made.__doc__ = doc
    return made


RequestType = python_enum(hw.RequestType, doc="Request types (VIRTIO_IOMMU_T_*).")
Status = python_enum(hw.Status, "VIRTIO_IOMMU_", doc="Request tail status (VIRTIO_IOMMU_S_*).")
Feature = python_enum(hw.Feature, "VIRTIO_IOMMU_",
                      doc="Device feature bit numbers (VIRTIO_IOMMU_F_*).")
MapFlag = python_enum(hw.MapFlag, "VIRTIO_IOMMU_MAP_F_", enum.IntFlag,
                      doc="MAP flags (VIRTIO_IOMMU_MAP_F_*).")
FaultReason = python_enum(hw.FaultReason, "VIRTIO_IOMMU_FAULT_R_",
                          doc="Fault record reasons (VIRTIO_IOMMU_FAULT_R_*).")
FaultFlag = python_enum(hw.FaultFlag, "VIRTIO_IOMMU_FAULT_F_", enum.IntFlag,
                        doc="Fault record flags (VIRTIO_IOMMU_FAULT_F_*); EXEC is Linux's "
                            "addition, not in the spec.")
ProbeProperty = python_enum(hw.ProbeProperty, "VIRTIO_IOMMU_PROBE_T_",
                            doc="PROBE property types (VIRTIO_IOMMU_PROBE_T_*).")
ResvMemSubtype = python_enum(hw.ResvMemSubtype, "VIRTIO_IOMMU_RESV_MEM_T_",
                             doc="RESV_MEM subtypes (VIRTIO_IOMMU_RESV_MEM_T_*).")

VIRTIO_ID_IOMMU = hw.VIRTIO_ID_IOMMU
NUM_QUEUES = hw.VIRTIO_IOMMU_NUM_VQS  # requestq and eventq
VIRTIO_IOMMU_ATTACH_F_BYPASS = hw.VIRTIO_IOMMU_ATTACH_F_BYPASS
CONFIG_SIZE = hw.CONFIG_SIZE  # sizeof(struct virtio_iommu_config)
FAULT_RECORD_SIZE = hw.FAULT_RECORD_SIZE
PROBE_PROPERTY_HEADER_SIZE = hw.PROBE_PROPERTY_HEADER_SIZE
RESV_MEM_PROPERTY_SIZE = hw.RESV_MEM_PROPERTY_SIZE

# vhost-user's protocol-features bit, which travels in the device's feature word
# (QEMU docs/interop/vhost-user.rst).
VHOST_USER_F_PROTOCOL_FEATURES = 30

# x86 MSI doorbell window (the LAPIC range), reported as RESV_MEM_T_MSI in PROBE.
MSI_WINDOW_X86 = (0xFEE0_0000, 0xFEEF_FFFF)


# --- viommu's private extensions (ext/uapi/virtio_iommu.pxd says where each comes from) ------
# ATTACH_TABLE and INVALIDATE, after the virtio-iommu ATTACH_TABLE/INVALIDATE proposal on the
# virtio-comment list; recoverable faults for guests that can answer them: the extended fault
# record and PAGE_RESP of the virtio-iommu page request proposal.
VIOMMU_F_ATTACH_TABLE = hw.VIOMMU_F_ATTACH_TABLE
VIOMMU_F_PAGE_REQUEST = hw.VIOMMU_F_PAGE_REQUEST

TableFormat = python_enum(hw.TableFormat, "VIRTIO_IOMMU_FORMAT_",
                          doc="ATTACH_TABLE `format` (VIRTIO_IOMMU_FORMAT_*).")
InvalidateScope = python_enum(hw.InvalidateScope, "VIRTIO_IOMMU_INVAL_S_",
                              doc="INVALIDATE `scope` (VIRTIO_IOMMU_INVAL_S_*).")
InvalidateCache = python_enum(hw.InvalidateCache, "VIRTIO_IOMMU_INVAL_C_", enum.IntFlag,
                              doc="INVALIDATE `caches` (VIRTIO_IOMMU_INVAL_C_*).")
InvalidateFlag = python_enum(hw.InvalidateFlag, "VIRTIO_IOMMU_INVAL_F_", enum.IntFlag,
                             doc="INVALIDATE `flags` (VIRTIO_IOMMU_INVAL_F_*).")
ExtFaultFlag = python_enum(hw.ExtFaultFlag, "VIRTIO_IOMMU_FAULT_F_", enum.IntFlag,
                           doc="Flags of the extended fault record, beside FaultFlag's.")
PageRespCode = python_enum(hw.PageRespCode, "VIRTIO_IOMMU_PAGE_RESP_",
                           doc="PAGE_RESP `code` (VIRTIO_IOMMU_PAGE_RESP_*).")
PAGE_RESP_F_PASID_VALID = hw.VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID
EXT_FAULT_RECORD_SIZE = hw.EXT_FAULT_RECORD_SIZE


# --- the virtio transport, virtio PCI and virtio-blk (ext/uapi/virtio_config.pxd,
# virtio_ring.pxd, virtio_pci.pxd, virtio_blk.pxd) ---------------------------------------------
DeviceStatus = python_enum(hw.DeviceStatus, "VIRTIO_CONFIG_S_", enum.IntFlag,
                           doc="device_status bits (VIRTIO_CONFIG_S_*).")
TransportFeature = python_enum(hw.TransportFeature, "VIRTIO_",
                               doc="Reserved (transport) feature bit numbers (VIRTIO_F_*).")
RingFeature = python_enum(hw.RingFeature, "VIRTIO_RING_",
                          doc="Ring feature bit numbers (VIRTIO_RING_F_*).")
VIRTIO_F_VERSION_1 = int(TransportFeature.F_VERSION_1)
VIRTIO_F_ACCESS_PLATFORM = int(TransportFeature.F_ACCESS_PLATFORM)
VirtioPciCapType = python_enum(hw.VirtioPciCapType, "VIRTIO_PCI_CAP_",
                               doc="virtio PCI capability cfg_type (VIRTIO_PCI_CAP_*).")
CommonCfg = python_enum(hw.CommonCfgOffset, "VIRTIO_PCI_COMMON_",
                        doc="Offsets in the common configuration (VIRTIO_PCI_COMMON_*).")
BlkFeature = python_enum(hw.BlkFeature, "VIRTIO_BLK_",
                         doc="virtio-blk feature bit numbers (VIRTIO_BLK_F_*).")
BlkRequestType = python_enum(hw.BlkRequestType, "VIRTIO_BLK_",
                             doc="virtio-blk request types (VIRTIO_BLK_T_*).")
BlkStatus = python_enum(hw.BlkStatus, "VIRTIO_BLK_",
                        doc="virtio-blk request status (VIRTIO_BLK_S_*).")
