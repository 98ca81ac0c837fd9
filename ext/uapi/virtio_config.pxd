# What every virtio device shares: the device status bits (virtio spec 2.1 "Device Status
# Field") and the reserved transport feature bits (spec 6 "Reserved Feature Bits"). Names
# and values are Linux include/uapi/linux/virtio_config.h's. Included by
# viommu/_dataplane.pxd; viommu.uapi is the Python face.

cpdef enum DeviceStatus:
    VIRTIO_CONFIG_S_ACKNOWLEDGE = 1     # the guest found the device
    VIRTIO_CONFIG_S_DRIVER = 2          # the guest has a driver for it
    VIRTIO_CONFIG_S_DRIVER_OK = 4       # the driver is ready
    VIRTIO_CONFIG_S_FEATURES_OK = 8     # feature negotiation is complete
    VIRTIO_CONFIG_S_NEEDS_RESET = 0x40  # the device hit an error it cannot recover from
    VIRTIO_CONFIG_S_FAILED = 0x80       # the driver gave up on the device

# Transport features (spec 6). VIRTIO_RING_F_* (28, 29) are in uapi/virtio_ring.pxd.
cpdef enum TransportFeature:
    VIRTIO_F_NOTIFY_ON_EMPTY = 24       # legacy
    VIRTIO_F_ANY_LAYOUT = 27            # legacy
    VIRTIO_F_VERSION_1 = 32             # virtio 1.x (not legacy)
    VIRTIO_F_ACCESS_PLATFORM = 33       # the device's DMA goes through the platform (IOMMU)
    VIRTIO_F_RING_PACKED = 34
    VIRTIO_F_IN_ORDER = 35
    VIRTIO_F_ORDER_PLATFORM = 36
    VIRTIO_F_SR_IOV = 37
    VIRTIO_F_NOTIFICATION_DATA = 38
    VIRTIO_F_NOTIF_CONFIG_DATA = 39
    VIRTIO_F_RING_RESET = 40
    VIRTIO_F_ADMIN_VQ = 41
