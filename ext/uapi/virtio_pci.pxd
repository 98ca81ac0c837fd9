# The virtio PCI transport, modern interface (virtio spec 4.1 "Virtio Over PCI Bus"; Linux
# include/uapi/linux/virtio_pci.h, whose names these are): the vendor-specific capabilities
# that locate the configuration structures in BARs, the common configuration structure, ISR
# bits and the "no vector" value. Included by viommu/_dataplane.pxd; viommu.uapi is the
# Python face. Little-endian, packed.

from libc.stdint cimport uint8_t, uint16_t, uint32_t

# spec 4.1.2 "PCI Device Discovery": vendor 0x1AF4, device 0x1040 + the virtio device ID
# for a non-transitional device (Linux virtio_pci_modern_dev.c:vp_modern_probe; QEMU
# PCI_DEVICE_ID_VIRTIO_10_BASE), revision 1 or higher.
cpdef enum:
    VIRTIO_PCI_VENDOR_ID = 0x1AF4
    VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040
    VIRTIO_PCI_MODERN_REVISION = 1
    PCI_CAP_ID_VNDR = 0x09              # Linux pci_regs.h: vendor-specific capability

# spec 4.1.4 "Virtio Structure PCI Capabilities": cfg_type
cpdef enum VirtioPciCapType:
    VIRTIO_PCI_CAP_COMMON_CFG = 1
    VIRTIO_PCI_CAP_NOTIFY_CFG = 2
    VIRTIO_PCI_CAP_ISR_CFG = 3
    VIRTIO_PCI_CAP_DEVICE_CFG = 4
    VIRTIO_PCI_CAP_PCI_CFG = 5
    VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
    VIRTIO_PCI_CAP_VENDOR_CFG = 9

cdef packed struct virtio_pci_cap:
    uint8_t cap_vndr                # PCI_CAP_ID_VNDR
    uint8_t cap_next
    uint8_t cap_len
    uint8_t cfg_type                # VirtioPciCapType
    uint8_t bar
    uint8_t id
    uint8_t padding[2]
    uint32_t offset                 # within the BAR
    uint32_t length

cdef packed struct virtio_pci_notify_cap:   # spec 4.1.4.4
    virtio_pci_cap cap
    uint32_t notify_off_multiplier

cdef packed struct virtio_pci_cfg_cap:      # spec 4.1.4.9: a window onto the BARs
    virtio_pci_cap cap
    uint8_t pci_cfg_data[4]

# spec 4.1.4.3 "Common configuration structure layout". Linux calls the driver's fields
# guest_feature*.
cdef packed struct virtio_pci_common_cfg:
    uint32_t device_feature_select
    uint32_t device_feature
    uint32_t guest_feature_select
    uint32_t guest_feature
    uint16_t msix_config
    uint16_t num_queues
    uint8_t device_status
    uint8_t config_generation
    uint16_t queue_select
    uint16_t queue_size
    uint16_t queue_msix_vector
    uint16_t queue_enable
    uint16_t queue_notify_off
    uint32_t queue_desc_lo
    uint32_t queue_desc_hi
    uint32_t queue_avail_lo
    uint32_t queue_avail_hi
    uint32_t queue_used_lo
    uint32_t queue_used_hi

cdef packed struct virtio_pci_modern_common_cfg:
    virtio_pci_common_cfg cfg
    uint16_t queue_notify_data      # VIRTIO_F_NOTIF_CONFIG_DATA
    uint16_t queue_reset            # VIRTIO_F_RING_RESET
    uint16_t admin_queue_index      # VIRTIO_F_ADMIN_VQ
    uint16_t admin_queue_num

# Offsets of the structures' fields, as Linux names them.
cpdef enum:
    VIRTIO_PCI_CAP_VNDR = 0
    VIRTIO_PCI_CAP_NEXT = 1
    VIRTIO_PCI_CAP_LEN = 2
    VIRTIO_PCI_CAP_CFG_TYPE = 3
    VIRTIO_PCI_CAP_BAR = 4
    VIRTIO_PCI_CAP_OFFSET = 8
    VIRTIO_PCI_CAP_LENGTH = 12
    VIRTIO_PCI_NOTIFY_CAP_MULT = 16

cpdef enum CommonCfgOffset:
    VIRTIO_PCI_COMMON_DFSELECT = 0
    VIRTIO_PCI_COMMON_DF = 4
    VIRTIO_PCI_COMMON_GFSELECT = 8
    VIRTIO_PCI_COMMON_GF = 12
    VIRTIO_PCI_COMMON_MSIX = 16
    VIRTIO_PCI_COMMON_NUMQ = 18
    VIRTIO_PCI_COMMON_STATUS = 20
    VIRTIO_PCI_COMMON_CFGGENERATION = 21
    VIRTIO_PCI_COMMON_Q_SELECT = 22
    VIRTIO_PCI_COMMON_Q_SIZE = 24
    VIRTIO_PCI_COMMON_Q_MSIX = 26
    VIRTIO_PCI_COMMON_Q_ENABLE = 28
    VIRTIO_PCI_COMMON_Q_NOFF = 30
    VIRTIO_PCI_COMMON_Q_DESCLO = 32
    VIRTIO_PCI_COMMON_Q_DESCHI = 36
    VIRTIO_PCI_COMMON_Q_AVAILLO = 40
    VIRTIO_PCI_COMMON_Q_AVAILHI = 44
    VIRTIO_PCI_COMMON_Q_USEDLO = 48
    VIRTIO_PCI_COMMON_Q_USEDHI = 52
    VIRTIO_PCI_COMMON_Q_NDATA = 56
    VIRTIO_PCI_COMMON_Q_RESET = 58
    VIRTIO_PCI_COMMON_ADM_Q_IDX = 60
    VIRTIO_PCI_COMMON_ADM_Q_NUM = 62

# spec 4.1.4.5 "ISR status capability": bit 0 a queue interrupt, bit 1 a configuration
# change; reading the ISR clears it.
cpdef enum:
    VIRTIO_PCI_ISR_QUEUE = 0x1
    VIRTIO_PCI_ISR_CONFIG = 0x2
    VIRTIO_MSI_NO_VECTOR = 0xffff       # spec 4.1.5.1.2: "no vector"
