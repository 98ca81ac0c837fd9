# Byte images of the virtio structures the Python device model presents to a driver, packed
# from the headers' structs (uapi/virtio_pci.pxd, uapi/virtio_blk.pxd): the virtio PCI
# capabilities and the virtio-blk device configuration; and the sizes Python checks.

VIRTIO_PCI_CAP_SIZE = sizeof(virtio_pci_cap)
VIRTIO_PCI_NOTIFY_CAP_SIZE = sizeof(virtio_pci_notify_cap)
VIRTIO_PCI_CFG_CAP_SIZE = sizeof(virtio_pci_cfg_cap)
VIRTIO_PCI_CFG_DATA_OFFSET = sizeof(virtio_pci_cap)     # pci_cfg_data follows the cap
VIRTIO_PCI_COMMON_CFG_SIZE = sizeof(virtio_pci_common_cfg)
VIRTIO_PCI_MODERN_COMMON_CFG_SIZE = sizeof(virtio_pci_modern_common_cfg)
VIRTIO_BLK_CONFIG_SIZE = sizeof(virtio_blk_config)
VIRTIO_BLK_OUTHDR_SIZE = sizeof(virtio_blk_outhdr)
VIRTIO_BLK_DISCARD_SEG_SIZE = sizeof(virtio_blk_discard_write_zeroes)
BLK_MAX_DISCARD_SEGMENTS = BLK_MAX_DISCARD_SEG


def encode_virtio_pci_cap(uint8_t cfg_type, uint8_t bar, uint32_t offset, uint32_t length,
                          uint32_t notify_off_multiplier=0) -> bytes:
    """A virtio structure capability (spec 4.1.4): struct virtio_pci_notify_cap for
    VIRTIO_PCI_CAP_NOTIFY_CFG, virtio_pci_cfg_cap (pci_cfg_data zero) for
    VIRTIO_PCI_CAP_PCI_CFG, virtio_pci_cap otherwise. cap_next is left 0 (the config
    space builder links the list)."""
    cdef virtio_pci_cfg_cap c           # the largest of the three
    cdef size_t size = sizeof(virtio_pci_cap)
    memset(&c, 0, sizeof(c))
    c.cap.cap_vndr = PCI_CAP_ID_VNDR
    c.cap.cfg_type = cfg_type
    c.cap.bar = bar
    c.cap.offset = offset
    c.cap.length = length
    if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
        (<virtio_pci_notify_cap *>&c).notify_off_multiplier = notify_off_multiplier
        size = sizeof(virtio_pci_notify_cap)
    elif cfg_type == VIRTIO_PCI_CAP_PCI_CFG:
        size = sizeof(virtio_pci_cfg_cap)
    c.cap.cap_len = <uint8_t>size
    return (<char *>&c)[:size]


def encode_virtio_blk_config(uint64_t capacity, uint32_t seg_max, uint32_t blk_size,
                             uint32_t max_discard_sectors=0, uint32_t max_discard_seg=0,
                             uint32_t discard_sector_alignment=0,
                             uint32_t max_write_zeroes_sectors=0,
                             uint32_t max_write_zeroes_seg=0,
                             bint write_zeroes_may_unmap=False) -> bytes:
    """struct virtio_blk_config (spec 5.2.4); the fields not given are zero."""
    cdef virtio_blk_config c
    memset(&c, 0, sizeof(c))
    c.capacity = capacity
    c.seg_max = seg_max
    c.blk_size = blk_size
    c.num_queues = 1
    c.max_discard_sectors = max_discard_sectors
    c.max_discard_seg = max_discard_seg
    c.discard_sector_alignment = discard_sector_alignment
    c.max_write_zeroes_sectors = max_write_zeroes_sectors
    c.max_write_zeroes_seg = max_write_zeroes_seg
    c.write_zeroes_may_unmap = write_zeroes_may_unmap
    return (<char *>&c)[:sizeof(c)]


def virtio_pci_common_layout() -> dict:
    """Offsets of struct virtio_pci_modern_common_cfg's fields, computed from the struct
    (tests compare them with the VIRTIO_PCI_COMMON_* offsets)."""
    cdef virtio_pci_modern_common_cfg m
    cdef size_t base = <size_t>&m
    return {"device_feature_select": <size_t>&m.cfg.device_feature_select - base,
            "device_feature": <size_t>&m.cfg.device_feature - base,
            "guest_feature_select": <size_t>&m.cfg.guest_feature_select - base,
            "guest_feature": <size_t>&m.cfg.guest_feature - base,
            "msix_config": <size_t>&m.cfg.msix_config - base,
            "num_queues": <size_t>&m.cfg.num_queues - base,
            "device_status": <size_t>&m.cfg.device_status - base,
            "config_generation": <size_t>&m.cfg.config_generation - base,
            "queue_select": <size_t>&m.cfg.queue_select - base,
            "queue_size": <size_t>&m.cfg.queue_size - base,
            "queue_msix_vector": <size_t>&m.cfg.queue_msix_vector - base,
            "queue_enable": <size_t>&m.cfg.queue_enable - base,
            "queue_notify_off": <size_t>&m.cfg.queue_notify_off - base,
            "queue_desc_lo": <size_t>&m.cfg.queue_desc_lo - base,
            "queue_desc_hi": <size_t>&m.cfg.queue_desc_hi - base,
            "queue_avail_lo": <size_t>&m.cfg.queue_avail_lo - base,
            "queue_avail_hi": <size_t>&m.cfg.queue_avail_hi - base,
            "queue_used_lo": <size_t>&m.cfg.queue_used_lo - base,
            "queue_used_hi": <size_t>&m.cfg.queue_used_hi - base,
            "queue_notify_data": <size_t>&m.queue_notify_data - base,
            "queue_reset": <size_t>&m.queue_reset - base,
            "admin_queue_index": <size_t>&m.admin_queue_index - base,
            "admin_queue_num": <size_t>&m.admin_queue_num - base}
