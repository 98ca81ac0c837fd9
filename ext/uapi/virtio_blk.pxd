# The virtio block device (virtio spec 5.2 "Block Device"; Linux
# include/uapi/linux/virtio_blk.h, whose names these are): feature bits, the device
# configuration layout, the request header, request types and statuses. Included by
# viommu/_dataplane.pxd; viommu.uapi is the Python face. Little-endian, packed.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cpdef enum:
    VIRTIO_ID_BLOCK = 2                 # spec 5 "Device Types"; Linux virtio_ids.h
    VIRTIO_BLK_ID_BYTES = 20            # GET_ID's answer: "20 bytes" (spec 5.2.6)
    VIRTIO_BLK_SECTOR_SIZE = 512        # `sector` counts 512-byte units (spec 5.2.6)
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 0x1

# spec 5.2.3 "Feature bits"
cpdef enum BlkFeature:
    VIRTIO_BLK_F_BARRIER = 0            # legacy
    VIRTIO_BLK_F_SIZE_MAX = 1
    VIRTIO_BLK_F_SEG_MAX = 2
    VIRTIO_BLK_F_GEOMETRY = 4
    VIRTIO_BLK_F_RO = 5
    VIRTIO_BLK_F_BLK_SIZE = 6
    VIRTIO_BLK_F_SCSI = 7               # legacy
    VIRTIO_BLK_F_FLUSH = 9
    VIRTIO_BLK_F_TOPOLOGY = 10
    VIRTIO_BLK_F_CONFIG_WCE = 11
    VIRTIO_BLK_F_MQ = 12
    VIRTIO_BLK_F_DISCARD = 13
    VIRTIO_BLK_F_WRITE_ZEROES = 14
    VIRTIO_BLK_F_LIFETIME = 15
    VIRTIO_BLK_F_SECURE_ERASE = 16
    VIRTIO_BLK_F_ZONED = 17

# spec 5.2.4 "Device configuration layout" (96 bytes in all)
cdef packed struct virtio_blk_geometry:
    uint16_t cylinders
    uint8_t heads
    uint8_t sectors

cdef packed struct virtio_blk_zoned_characteristics:
    uint32_t zone_sectors
    uint32_t max_open_zones
    uint32_t max_active_zones
    uint32_t max_append_sectors
    uint32_t write_granularity
    uint8_t model
    uint8_t unused2[3]

cdef packed struct virtio_blk_config:
    uint64_t capacity                   # in 512-byte sectors
    uint32_t size_max                   # VIRTIO_BLK_F_SIZE_MAX
    uint32_t seg_max                    # VIRTIO_BLK_F_SEG_MAX
    virtio_blk_geometry geometry        # VIRTIO_BLK_F_GEOMETRY
    uint32_t blk_size                   # VIRTIO_BLK_F_BLK_SIZE
    uint8_t physical_block_exp          # VIRTIO_BLK_F_TOPOLOGY ...
    uint8_t alignment_offset
    uint16_t min_io_size
    uint32_t opt_io_size
    uint8_t wce                         # VIRTIO_BLK_F_CONFIG_WCE ("writeback" in the spec)
    uint8_t unused
    uint16_t num_queues                 # VIRTIO_BLK_F_MQ
    uint32_t max_discard_sectors        # VIRTIO_BLK_F_DISCARD
    uint32_t max_discard_seg
    uint32_t discard_sector_alignment
    uint32_t max_write_zeroes_sectors   # VIRTIO_BLK_F_WRITE_ZEROES
    uint32_t max_write_zeroes_seg
    uint8_t write_zeroes_may_unmap
    uint8_t unused1[3]
    uint32_t max_secure_erase_sectors   # VIRTIO_BLK_F_SECURE_ERASE
    uint32_t max_secure_erase_seg
    uint32_t secure_erase_sector_alignment
    virtio_blk_zoned_characteristics zoned   # VIRTIO_BLK_F_ZONED

# spec 5.2.6 "Device Operation": request types ...
cpdef enum BlkRequestType:
    VIRTIO_BLK_T_IN = 0
    VIRTIO_BLK_T_OUT = 1
    VIRTIO_BLK_T_SCSI_CMD = 2           # legacy
    VIRTIO_BLK_T_FLUSH = 4
    VIRTIO_BLK_T_GET_ID = 8
    VIRTIO_BLK_T_GET_LIFETIME = 10
    VIRTIO_BLK_T_DISCARD = 11
    VIRTIO_BLK_T_WRITE_ZEROES = 13
    VIRTIO_BLK_T_SECURE_ERASE = 14

# ... and the status byte, the last device-writable byte of every request
cpdef enum BlkStatus:
    VIRTIO_BLK_S_OK = 0
    VIRTIO_BLK_S_IOERR = 1
    VIRTIO_BLK_S_UNSUPP = 2

# The device-readable header that starts every request
cdef packed struct virtio_blk_outhdr:
    uint32_t type                       # BlkRequestType
    uint32_t ioprio                     # "reserved" in the spec; Linux fills req_get_ioprio
    uint64_t sector

# DISCARD and WRITE_ZEROES carry these segments as data
cdef packed struct virtio_blk_discard_write_zeroes:
    uint64_t sector
    uint32_t num_sectors
    uint32_t flags                      # VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
