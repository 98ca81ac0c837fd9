"""The iommufd host edge (Linux include/uapi/linux/iommufd.h, drivers/iommu/iommufd/eventq.c):
IO page fault groups in and page responses out through a fault fd, SMMUv3 events in through a
vEVENTQ fd, exactly as a VMM reads and writes them against a real /dev/iommu.

Fault fd (IOMMU_FAULT_QUEUE_ALLOC). read() yields `struct iommu_hwpt_pgfault` records, 40 bytes
each and only whole groups: every record of a group carries the group's cookie, the last one
LAST_PAGE. The read count must be a multiple of 40 (else -ESPIPE), and a group that does not fit
in the buffer is not delivered at all. write() takes `struct iommu_hwpt_page_response` (8 bytes,
multiples only); an unknown cookie or a code other than SUCCESS/INVALID is -EINVAL. Each group
is answered once; destroying the fault object answers every group still pending with INVALID.

vEVENTQ fd (IOMMU_VEVENTQ_ALLOC). read() yields `struct iommufd_vevent_header` (8 bytes) each
followed by its payload, for ARM SMMUv3 the 32-byte event record with StreamID replaced by the
vDEVICE's virt_id. `sequence` counts 0..INT_MAX and wraps to 0; a jump of k+1 means k events
were dropped because the queue was full. A dropped event with no successor yet shows up as a
payload-less header flagged LOST_EVENTS at the tail; it carries the sequence number of the last
dropped event (eventq.c re-appends it for every drop), so it stands for one lost event itself.

Both kernel fds return 0 from read() when nothing is queued: there is no EOF. Over a socket or
a pipe (the test harness) 0 does mean the peer closed; the readers tell the two apart by the
file type, so the same classes take either.

On a real host
--------------
All ioctls go to the /dev/iommu fd; numbers are _IO(';', cmd) = 0x3b00 | cmd (IOMMUFD_TYPE).

1. Bind the VFIO device cdev (VFIO_DEVICE_BIND_IOMMUFD) to get its `dev_id`; that is the dev_id
   in every page fault record, so `FaultQueue(fd, {dev_id: endpoint_id})`.
2. IOMMU_FAULT_QUEUE_ALLOC (0x3b8e; `iommu_fault_alloc {size, flags=0, out_fault_id,
   out_fault_fd}`) gives the fault object's ID and the fault fd.
3. IOMMU_HWPT_ALLOC (0x3b89) for the HWPT the device attaches to, with flags
   IOMMU_HWPT_FAULT_ID_VALID (1 << 2) and `fault_id` (offset 40) = out_fault_id: its IO page
   faults are now delivered on the fault fd. (A PRI-capable VF is refused: PRI is shared
   with its PF.)
4. IOMMU_VIOMMU_ALLOC (0x3b90; type IOMMU_VIOMMU_TYPE_ARM_SMMUV3, the device's dev_id, the
   nesting-parent HWPT) gives viommu_id.
5. IOMMU_VDEVICE_ALLOC (0x3b91; viommu_id, dev_id, virt_id = the virtio-iommu endpoint ID).
   The kernel writes virt_id into the StreamID of every forwarded event, so SID = endpoint.
6. IOMMU_VEVENTQ_ALLOC (0x3b93; viommu_id, type IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, veventq_depth)
   gives the vEVENTQ fd. Depth bounds the queue; beyond it events are dropped and counted.
7. `loop.add_reader(fd, queue.on_readable)` for both. Those fds go to these classes unchanged.

The ioctls themselves are not implemented here: these machines have no /dev/iommu.

The layouts are in `uapi`, the readers in `queues`; this package re-exports both.
"""

from __future__ import annotations

from viommu.transport.iommufd.queues import (
    FAULT_READ_SIZE,
    VEVENTQ_READ_SIZE,
    FaultGroup,
    FaultQueue,
    IommufdError,
    PriMustBeDisabled,
    UnknownCookie,
    VeventQueue,
)
from viommu.transport.iommufd.uapi import (
    HWPT_PAGE_RESPONSE,
    HWPT_PGFAULT,
    IOMMU_FAULT_QUEUE_ALLOC,
    IOMMU_HWPT_ALLOC,
    IOMMU_HWPT_FAULT_ID_VALID,
    IOMMU_PGFAULT_FLAGS_LAST_PAGE,
    IOMMU_PGFAULT_FLAGS_PASID_VALID,
    IOMMU_PGFAULT_PERM_EXEC,
    IOMMU_PGFAULT_PERM_PRIV,
    IOMMU_PGFAULT_PERM_READ,
    IOMMU_PGFAULT_PERM_WRITE,
    IOMMU_VDEVICE_ALLOC,
    IOMMU_VEVENTQ_ALLOC,
    IOMMU_VEVENTQ_FLAG_LOST_EVENTS,
    IOMMU_VEVENTQ_TYPE_ARM_SMMUV3,
    IOMMU_VIOMMU_ALLOC,
    IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
    IOMMUFD_CMD_FAULT_QUEUE_ALLOC,
    IOMMUFD_CMD_HWPT_ALLOC,
    IOMMUFD_CMD_VDEVICE_ALLOC,
    IOMMUFD_CMD_VEVENTQ_ALLOC,
    IOMMUFD_CMD_VIOMMU_ALLOC,
    IOMMUFD_PAGE_RESP_INVALID,
    IOMMUFD_PAGE_RESP_SUCCESS,
    IOMMUFD_TYPE,
    PAGE_MASK,
    VEVENT_ARM_SMMUV3_SIZE,
    VEVENT_HEADER,
    VEVENT_SEQUENCE_MAX,
    HwptPageResponse,
    HwptPgfault,
    VeventHeader,
)

__all__ = [
    "FAULT_READ_SIZE",
    "FaultGroup",
    "FaultQueue",
    "HWPT_PAGE_RESPONSE",
    "HWPT_PGFAULT",
    "HwptPageResponse",
    "HwptPgfault",
    "IOMMUFD_CMD_FAULT_QUEUE_ALLOC",
    "IOMMUFD_CMD_HWPT_ALLOC",
    "IOMMUFD_CMD_VDEVICE_ALLOC",
    "IOMMUFD_CMD_VEVENTQ_ALLOC",
    "IOMMUFD_CMD_VIOMMU_ALLOC",
    "IOMMUFD_PAGE_RESP_INVALID",
    "IOMMUFD_PAGE_RESP_SUCCESS",
    "IOMMUFD_TYPE",
    "IOMMU_FAULT_QUEUE_ALLOC",
    "IOMMU_HWPT_ALLOC",
    "IOMMU_HWPT_FAULT_ID_VALID",
    "IOMMU_PGFAULT_FLAGS_LAST_PAGE",
    "IOMMU_PGFAULT_FLAGS_PASID_VALID",
    "IOMMU_PGFAULT_PERM_EXEC",
    "IOMMU_PGFAULT_PERM_PRIV",
    "IOMMU_PGFAULT_PERM_READ",
    "IOMMU_PGFAULT_PERM_WRITE",
    "IOMMU_VDEVICE_ALLOC",
    "IOMMU_VEVENTQ_ALLOC",
    "IOMMU_VEVENTQ_FLAG_LOST_EVENTS",
    "IOMMU_VEVENTQ_TYPE_ARM_SMMUV3",
    "IOMMU_VIOMMU_ALLOC",
    "IOMMU_VIOMMU_TYPE_ARM_SMMUV3",
    "IommufdError",
    "PAGE_MASK",
    "PriMustBeDisabled",
    "UnknownCookie",
    "VEVENTQ_READ_SIZE",
    "VEVENT_ARM_SMMUV3_SIZE",
    "VEVENT_HEADER",
    "VEVENT_SEQUENCE_MAX",
    "VeventHeader",
    "VeventQueue",
]
