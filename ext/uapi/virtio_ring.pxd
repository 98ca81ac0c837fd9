# The virtio 1.x split virtqueue (virtio spec 2.7 "Split Virtqueues"; Linux
# include/uapi/linux/virtio_ring.h). Fields are little-endian, as is the host (viommu
# supports little-endian hosts only). Included by viommu/_dataplane.pxd.

from libc.stdint cimport uint16_t, uint32_t, uint64_t

# Ring features (spec 6 "Reserved Feature Bits"), with the transport's in uapi/virtio_config.pxd
cpdef enum RingFeature:
    VIRTIO_RING_F_INDIRECT_DESC = 28    # descriptors may point at tables of descriptors
    VIRTIO_RING_F_EVENT_IDX = 29        # used_event / avail_event

cdef enum:
    VRING_DESC_F_NEXT = 1           # the buffer continues in `next`
    VRING_DESC_F_WRITE = 2          # device-writable
    VRING_DESC_F_INDIRECT = 4       # a table of descriptors (VIRTIO_RING_F_INDIRECT_DESC)
    VRING_USED_F_NO_NOTIFY = 1      # the device asks the driver not to kick
    VRING_AVAIL_F_NO_INTERRUPT = 1  # the driver asks the device not to interrupt
    VIRTQUEUE_MAX_SIZE = 32768      # "Queue Size ... maximum 32768" (spec 2.7)

# Alignment the spec requires of each part (2.7 "Virtqueue Alignment" table).
cdef enum:
    VRING_DESC_ALIGN_SIZE = 16
    VRING_AVAIL_ALIGN_SIZE = 2
    VRING_USED_ALIGN_SIZE = 4

cdef struct vring_desc:
    uint64_t addr                   # guest-physical
    uint32_t len
    uint16_t flags                  # VRING_DESC_F_*
    uint16_t next

cdef struct vring_avail:
    uint16_t flags                  # VRING_AVAIL_F_*
    uint16_t idx
    uint16_t ring[0]                # [queue size], then le16 used_event (VIRTIO_F_EVENT_IDX)

cdef struct vring_used_elem:
    uint32_t id                     # head of the chain
    uint32_t len                    # bytes written into its device-writable part

cdef struct vring_used:
    uint16_t flags                  # VRING_USED_F_*
    uint16_t idx
    vring_used_elem ring[0]         # [queue size], then le16 avail_event (VIRTIO_F_EVENT_IDX)
