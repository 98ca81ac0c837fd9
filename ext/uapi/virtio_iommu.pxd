# virtio-iommu: the device's identity, features, config space, requests and fault records
# (virtio spec 5.13 "IOMMU Device"; Linux include/uapi/linux/virtio_iommu.h), then the
# requests viommu adds under private feature bits. Names are the Linux header's.
#
# Included by viommu/_dataplane.pxd, so every `cpdef enum` below is also a Python enum
# class of viommu._dataplane; viommu.uapi is their Python face. Structs are packed and
# little-endian (the host is little-endian, as virtio-iommu structures are). The request
# structs end with their tail, as Linux's do: a request's device-readable part is
# sizeof(struct) - sizeof(virtio_iommu_req_tail).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cpdef enum:
    VIRTIO_ID_IOMMU = 23            # spec 5 "Device Types"; Linux virtio_ids.h
    # spec 5.13.2 "Virtqueues": 0 requestq, 1 eventq
    VIRTIO_IOMMU_REQUESTQ = 0
    VIRTIO_IOMMU_EVENTQ = 1
    VIRTIO_IOMMU_NUM_VQS = 2

# --- spec 5.13.3 "Feature bits" --------------------------------------------------------------
cpdef enum Feature:
    VIRTIO_IOMMU_F_INPUT_RANGE = 0
    VIRTIO_IOMMU_F_DOMAIN_RANGE = 1
    VIRTIO_IOMMU_F_MAP_UNMAP = 2
    VIRTIO_IOMMU_F_BYPASS = 3
    VIRTIO_IOMMU_F_PROBE = 4
    VIRTIO_IOMMU_F_MMIO = 5
    VIRTIO_IOMMU_F_BYPASS_CONFIG = 6

# --- spec 5.13.4 "Device configuration layout" -----------------------------------------------
cdef packed struct virtio_iommu_range_64:
    uint64_t start
    uint64_t end

cdef packed struct virtio_iommu_range_32:
    uint32_t start
    uint32_t end

cdef packed struct virtio_iommu_config:
    uint64_t page_size_mask
    virtio_iommu_range_64 input_range
    virtio_iommu_range_32 domain_range
    uint32_t probe_size
    uint8_t bypass                  # VIRTIO_IOMMU_F_BYPASS_CONFIG; driver-writable
    uint8_t reserved[3]

# --- spec 5.13.6 "Device operations", one subsection per request ------------------------------
cpdef enum RequestType:
    VIRTIO_IOMMU_T_ATTACH = 1
    VIRTIO_IOMMU_T_DETACH = 2
    VIRTIO_IOMMU_T_MAP = 3
    VIRTIO_IOMMU_T_UNMAP = 4
    VIRTIO_IOMMU_T_PROBE = 5
    # viommu's private extensions (layouts at the end of this file): bind SMMUv3 STE words
    # and invalidate cached translations, after the virtio-iommu ATTACH_TABLE/INVALIDATE
    # proposal on the virtio-comment list; answer a page request, after PAGE_RESP of the
    # virtio-iommu page request proposal ("iommu/virtio: Add headers for binding pasid
    # table in iommu", LKML RFC 2021, with the maintainer's review: no domain field).
    VIRTIO_IOMMU_T_ATTACH_TABLE = 6
    VIRTIO_IOMMU_T_INVALIDATE = 7
    VIRTIO_IOMMU_T_PAGE_RESP = 8

cpdef enum Status:
    VIRTIO_IOMMU_S_OK = 0
    VIRTIO_IOMMU_S_IOERR = 1
    VIRTIO_IOMMU_S_UNSUPP = 2
    VIRTIO_IOMMU_S_DEVERR = 3
    VIRTIO_IOMMU_S_INVAL = 4
    VIRTIO_IOMMU_S_RANGE = 5
    VIRTIO_IOMMU_S_NOENT = 6
    VIRTIO_IOMMU_S_FAULT = 7
    VIRTIO_IOMMU_S_NOMEM = 8

cdef packed struct virtio_iommu_req_head:
    uint8_t type                    # RequestType
    uint8_t reserved[3]

cdef packed struct virtio_iommu_req_tail:
    uint8_t status                  # Status
    uint8_t reserved[3]

# ATTACH request
cpdef enum:
    VIRTIO_IOMMU_ATTACH_F_BYPASS = 1 << 0

cdef packed struct virtio_iommu_req_attach:
    virtio_iommu_req_head head
    uint32_t domain
    uint32_t endpoint
    uint32_t flags                  # VIRTIO_IOMMU_ATTACH_F_*
    uint8_t reserved[4]
    virtio_iommu_req_tail tail

# DETACH request
cdef packed struct virtio_iommu_req_detach:
    virtio_iommu_req_head head
    uint32_t domain
    uint32_t endpoint
    uint8_t reserved[8]
    virtio_iommu_req_tail tail

# MAP request
cpdef enum MapFlag:
    VIRTIO_IOMMU_MAP_F_READ = 1 << 0
    VIRTIO_IOMMU_MAP_F_WRITE = 1 << 1
    VIRTIO_IOMMU_MAP_F_MMIO = 1 << 2    # VIRTIO_IOMMU_F_MMIO

cdef packed struct virtio_iommu_req_map:
    virtio_iommu_req_head head
    uint32_t domain
    uint64_t virt_start
    uint64_t virt_end               # inclusive
    uint64_t phys_start
    uint32_t flags                  # MapFlag
    virtio_iommu_req_tail tail

# UNMAP request
cdef packed struct virtio_iommu_req_unmap:
    virtio_iommu_req_head head
    uint32_t domain
    uint64_t virt_start
    uint64_t virt_end
    uint8_t reserved[4]
    virtio_iommu_req_tail tail

# PROBE request and its properties
cpdef enum ProbeProperty:
    VIRTIO_IOMMU_PROBE_T_NONE = 0
    VIRTIO_IOMMU_PROBE_T_RESV_MEM = 1

cdef enum:
    VIRTIO_IOMMU_PROBE_T_MASK = 0xfff

cdef packed struct virtio_iommu_probe_property:
    uint16_t type                   # ProbeProperty
    uint16_t length                 # bytes after this header

cpdef enum ResvMemSubtype:
    VIRTIO_IOMMU_RESV_MEM_T_RESERVED = 0
    VIRTIO_IOMMU_RESV_MEM_T_MSI = 1

cdef packed struct virtio_iommu_probe_resv_mem:
    virtio_iommu_probe_property head
    uint8_t subtype                 # ResvMemSubtype
    uint8_t reserved[3]
    uint64_t start
    uint64_t end                    # inclusive

cdef packed struct virtio_iommu_req_probe:
    virtio_iommu_req_head head
    uint32_t endpoint
    uint8_t reserved[64]
    # then the device-writable properties (probe_size bytes) and the tail

# Fault reporting (the eventq)
cpdef enum FaultReason:
    VIRTIO_IOMMU_FAULT_R_UNKNOWN = 0
    VIRTIO_IOMMU_FAULT_R_DOMAIN = 1
    VIRTIO_IOMMU_FAULT_R_MAPPING = 2

cpdef enum FaultFlag:
    VIRTIO_IOMMU_FAULT_F_READ = 1 << 0
    VIRTIO_IOMMU_FAULT_F_WRITE = 1 << 1
    VIRTIO_IOMMU_FAULT_F_EXEC = 1 << 2      # Linux's addition, not in the spec
    VIRTIO_IOMMU_FAULT_F_ADDRESS = 1 << 8

cdef packed struct virtio_iommu_fault:
    uint8_t reason                  # FaultReason
    uint8_t reserved[3]
    uint32_t flags                  # FaultFlag
    uint32_t endpoint
    uint8_t reserved1[4]
    uint64_t address


# --- viommu's private extensions -------------------------------------------------------------
# The proposals' feature numbers collide with each other and with the spec's own bits, so
# these are viommu's: bits in the device-specific range (spec 6 "Reserved Feature Bits":
# 0-23 and 50-127), far from any proposal's.
cpdef enum:
    VIOMMU_F_ATTACH_TABLE = 63      # ATTACH_TABLE and INVALIDATE
    VIOMMU_F_PAGE_REQUEST = 62      # recoverable faults: extended fault records, PAGE_RESP

# ATTACH_TABLE: the stream's SMMUv3 STE words (iommufd's iommu_hwpt_arm_smmuv3 ste[0..1])
# in the proposal's generic 128-byte request, format-specific from `format` on.
cpdef enum TableFormat:
    VIRTIO_IOMMU_FORMAT_ARM_SMMU3 = 1

cdef packed struct virtio_iommu_req_attach_table:
    virtio_iommu_req_head head
    uint32_t domain
    uint32_t endpoint
    uint8_t format                  # TableFormat
    uint8_t reserved[3]
    uint64_t ste[2]                 # STE dwords 0 and 1 (V, Config, S1*; S1DSS, S1STALLD)
    uint8_t reserved2[92]
    virtio_iommu_req_tail tail

# INVALIDATE: which cached configuration or translations to drop.
cpdef enum InvalidateScope:
    VIRTIO_IOMMU_INVAL_S_DOMAIN = 1
    VIRTIO_IOMMU_INVAL_S_PASID = 2
    VIRTIO_IOMMU_INVAL_S_ADDRESS = 3

cpdef enum InvalidateCache:
    VIRTIO_IOMMU_INVAL_C_PASID = 1 << 0     # configuration: context descriptors
    VIRTIO_IOMMU_INVAL_C_TLB = 1 << 1

cpdef enum InvalidateFlag:
    VIRTIO_IOMMU_INVAL_F_LEAF = 1 << 0
    VIRTIO_IOMMU_INVAL_F_PASID = 1 << 1
    VIRTIO_IOMMU_INVAL_F_ID = 1 << 2
    VIRTIO_IOMMU_INVAL_F_GLOBAL = 1 << 3

cdef packed struct virtio_iommu_req_invalidate:
    virtio_iommu_req_head head
    uint8_t scope                   # InvalidateScope
    uint8_t caches                  # InvalidateCache
    uint16_t flags                  # InvalidateFlag
    uint32_t domain
    uint32_t pasid
    uint64_t id                     # architecture ID; SMMUv3: the ASID in bits [15:0]
    uint64_t address
    uint64_t nr_pages
    uint8_t page_size               # log2
    uint8_t reserved[19]
    virtio_iommu_req_tail tail

# PAGE_RESP: the answer to one page request group.
cpdef enum PageRespCode:
    VIRTIO_IOMMU_PAGE_RESP_SUCCESS = 0
    VIRTIO_IOMMU_PAGE_RESP_INVALID = 1
    VIRTIO_IOMMU_PAGE_RESP_FAILURE = 2

cpdef enum:
    VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID = 1 << 0

cdef packed struct virtio_iommu_req_page_resp:
    virtio_iommu_req_head head
    uint32_t endpoint
    uint32_t pasid
    uint16_t grpid                  # the PRI Page Request Group Index
    uint16_t code                   # PageRespCode
    uint32_t flags                  # VIRTIO_IOMMU_PAGE_RESP_F_*
    uint8_t reserved[4]
    virtio_iommu_req_tail tail

# The extended fault record, for drivers that negotiated VIOMMU_F_PAGE_REQUEST: the
# PASID in the spec record's reserved1 (as the maintainer's review of the page request
# proposal suggests), then the group ID. Its flags add these to FaultFlag's:
cpdef enum ExtFaultFlag:
    VIRTIO_IOMMU_FAULT_F_PASID = 1 << 9         # `pasid` is valid
    VIRTIO_IOMMU_FAULT_F_PAGE_REQUEST = 1 << 10 # a page request: answer it with PAGE_RESP
    VIRTIO_IOMMU_FAULT_F_LAST = 1 << 11         # last request of its group
    VIRTIO_IOMMU_FAULT_F_PRIV = 1 << 12         # privileged access requested

cdef packed struct virtio_iommu_fault_ext:
    uint8_t reason                  # FaultReason
    uint8_t reserved[3]
    uint32_t flags                  # FaultFlag | ExtFaultFlag
    uint32_t endpoint
    uint32_t pasid
    uint64_t address
    uint16_t grpid
    uint8_t reserved2[6]
