# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""viommu data plane: guest memory, split virtqueues, virtio-iommu requests, MAP domains,
the translation engine, the requestq thread and the virtio-blk endpoint's queue, compiled
as one extension.

The spec layouts and constants come from the headers under ext/uapi/ (included by this
module's .pxd, which exports their `cpdef enum`s to Python; viommu.uapi is their Python
face). Each concern has a file of its own under ext/, included below in dependency order.
Everything the guest controls is read once and checked against the vhost-user memory
table before it is used. The host is assumed little-endian, as are virtio 1.x rings,
virtio-iommu structures and SMMUv3 structures.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset


cdef extern from "barrier.h":
    void viommu_mb() nogil
    uint16_t viommu_load16(const void *p) nogil
    void viommu_store16(void *p, uint16_t v) nogil
    int viommu_load_flag(const int *p) nogil
    void viommu_store_flag(int *p, int v) nogil
    void viommu_cpu_relax() nogil


include "memory.pxi"           # guest RAM regions; word and bit-field readers
include "virtqueue.pxi"        # split virtqueues
include "requests.pxi"         # virtio-iommu requests: parse, answer
include "mappings.pxi"         # MAP domains and the MAP/UNMAP rules
include "access.pxi"           # access bits, permission masks, a translation's result
include "event_records.pxi"    # SMMUv3 event records, virtio-iommu fault records
include "stage2.pxi"           # the host's stage 2 over guest RAM
include "iotlb.pxi"            # cached translations
include "streams.pxi"          # the stream table
include "stage1.pxi"           # STE, CD and VMSAv8-64 table walks
include "engine.pxi"           # Engine: the above composed, and its Python API
include "dataplane_lock.pxi"   # the lock between the queue threads and Python
include "wakeups.pxi"          # eventfds, epoll and clocks for the queue threads
include "poll_policy.pxi"      # how long the request thread busy-polls
include "requestq.pxi"         # the requestq on its own thread
include "blk_requests.pxi"     # virtio-blk requests against a backing file
include "blkq.pxi"             # a virtio-blk endpoint's requestq, walked through translation
include "virtio_layouts.pxi"   # virtio PCI capabilities and virtio-blk config, as bytes
include "eventq.pxi"           # the eventq on its own thread


# Sizes of the headers' structs that Python packs or checks (viommu.uapi re-exports them).
CONFIG_SIZE = sizeof(virtio_iommu_config)
PROBE_PROPERTY_HEADER_SIZE = sizeof(virtio_iommu_probe_property)
RESV_MEM_PROPERTY_SIZE = sizeof(virtio_iommu_probe_resv_mem)
