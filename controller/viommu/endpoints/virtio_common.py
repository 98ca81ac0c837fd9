"""The common configuration structure of a virtio PCI device (virtio spec 4.1.4.3, struct
virtio_pci_modern_common_cfg in Linux include/uapi/linux/virtio_pci.h): feature selection
and negotiation, device_status, MSI-X vectors and the queues' configuration, as the device
side keeps them.

What the spec asks of the device (4.1.4.3.1 and 2.1.2):
- device_feature shows bits 32*select..32*select+31 of the offered features; selects past
  the offered words read 0 (Linux reads four words since it knows 128 feature bits);
- writing 0 to device_status resets the device, which then reads 0;
- queue_size reads 0 for a queue that does not exist; the driver may write a smaller power
  of 2; queue_enable reads 0 after reset; queue_notify_off is fixed (the queue's index);
- a vector the device cannot use reads back as VIRTIO_MSI_NO_VECTOR (4.1.5.1.2.1);
- DEVICE_NEEDS_RESET is the device's: a driver writing device_status back (Linux's
  virtio_add_status reads, ORs and writes) neither sets nor clears it.
Queue fields of an enabled queue, and feature words after FEATURES_OK, keep their values.
"""

from __future__ import annotations

import dataclasses
import logging
import struct

from viommu import _dataplane as hw
from viommu.uapi import CommonCfg, DeviceStatus

log = logging.getLogger(__name__)

NO_VECTOR = hw.VIRTIO_MSI_NO_VECTOR
SIZE = hw.VIRTIO_PCI_MODERN_COMMON_CFG_SIZE

# (offset, size, name): the fields in the order of the struct
FIELDS = (
    (CommonCfg.DFSELECT, 4, "device_feature_select"),
    (CommonCfg.DF, 4, "device_feature"),
    (CommonCfg.GFSELECT, 4, "guest_feature_select"),
    (CommonCfg.GF, 4, "guest_feature"),
    (CommonCfg.MSIX, 2, "msix_config"),
    (CommonCfg.NUMQ, 2, "num_queues"),
    (CommonCfg.STATUS, 1, "device_status"),
    (CommonCfg.CFGGENERATION, 1, "config_generation"),
    (CommonCfg.Q_SELECT, 2, "queue_select"),
    (CommonCfg.Q_SIZE, 2, "queue_size"),
    (CommonCfg.Q_MSIX, 2, "queue_msix_vector"),
    (CommonCfg.Q_ENABLE, 2, "queue_enable"),
    (CommonCfg.Q_NOFF, 2, "queue_notify_off"),
    (CommonCfg.Q_DESCLO, 4, "queue_desc_lo"),
    (CommonCfg.Q_DESCHI, 4, "queue_desc_hi"),
    (CommonCfg.Q_AVAILLO, 4, "queue_avail_lo"),
    (CommonCfg.Q_AVAILHI, 4, "queue_avail_hi"),
    (CommonCfg.Q_USEDLO, 4, "queue_used_lo"),
    (CommonCfg.Q_USEDHI, 4, "queue_used_hi"),
    (CommonCfg.Q_NDATA, 2, "queue_notify_data"),
    (CommonCfg.Q_RESET, 2, "queue_reset"),
    (CommonCfg.ADM_Q_IDX, 2, "admin_queue_index"),
    (CommonCfg.ADM_Q_NUM, 2, "admin_queue_num"),
)
_FORMATS = {1: "<B", 2: "<H", 4: "<I"}
# The 64-bit ring addresses, as 32-bit halves: name -> (QueueConfig field, shift)
_ADDRESS_HALVES = {"queue_desc_lo": ("desc", 0), "queue_desc_hi": ("desc", 32),
                   "queue_avail_lo": ("driver", 0), "queue_avail_hi": ("driver", 32),
                   "queue_used_lo": ("device", 0), "queue_used_hi": ("device", 32)}
# Fields of the common configuration that read back one of our attributes as it is.
_REGISTERS = {"device_feature_select": "device_feature_select",
              "guest_feature_select": "driver_feature_select", "msix_config": "msix_config",
              "num_queues": "num_queues", "device_status": "status",
              "queue_select": "queue_select"}


def _feature_word(features: int, select: int) -> int:
    """The 32-bit window of the 64 feature bits that `select` picks (0 past the second)."""
    return features >> (32 * select) & 0xFFFF_FFFF if select < 2 else 0


@dataclasses.dataclass
class QueueConfig:
    """One virtqueue as the driver configured it; the three areas are IOVAs under
    VIRTIO_F_ACCESS_PLATFORM (spec 2.7: descriptor table, driver area = avail ring,
    device area = used ring)."""

    size: int
    msix_vector: int = NO_VECTOR
    enable: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


@dataclasses.dataclass
class CommonChange:
    """What a write asked of the device beyond storing fields."""

    reset: bool = False  # device_status = 0
    features_ok: bool = False  # FEATURES_OK newly set: check the driver's features
    enabled: list[int] = dataclasses.field(default_factory=list)  # queue_enable = 1


class CommonConfig:
    def __init__(self, device_features: int, num_queues: int, max_queue_size: int,
                 msix_vectors: int) -> None:
        self.device_features = device_features
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.msix_vectors = msix_vectors
        self.reset()

    def reset(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.msix_config = NO_VECTOR
        self.status = 0
        self.queue_select = 0
        self.queues = [QueueConfig(self.max_queue_size) for _ in range(self.num_queues)]

    @property
    def selected(self) -> QueueConfig | None:
        return self.queues[self.queue_select] if self.queue_select < self.num_queues else None

    # --- reads --------------------------------------------------------------------------

    def read(self, offset: int, count: int) -> bytes:
        image = self.image()
        data = image[offset:offset + count]
        return data + bytes(count - len(data))

    def image(self) -> bytes:
        out = bytearray(SIZE)
        for offset, size, name in FIELDS:
            struct.pack_into(_FORMATS[size], out, offset, self._get(name))
        return bytes(out)

    def _get(self, name: str) -> int:
        q = self.selected
        if name == "device_feature":
            return _feature_word(self.device_features, self.device_feature_select)
        if name == "guest_feature":
            return _feature_word(self.driver_features, self.driver_feature_select)
        if name in _REGISTERS:
            return getattr(self, _REGISTERS[name])
        if q is None:
            return 0  # queue_size 0: "the queue is unavailable"
        if name in _ADDRESS_HALVES:
            attr, shift = _ADDRESS_HALVES[name]
            return getattr(q, attr) >> shift & 0xFFFF_FFFF
        return {"queue_size": q.size, "queue_msix_vector": q.msix_vector,
                "queue_enable": int(q.enable),
                "queue_notify_off": self.queue_select}.get(name, 0)

    # --- writes -------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> CommonChange:
        """Apply a driver write of any width; fields it touches take their new bytes."""
        change = CommonChange()
        image = bytearray(self.image())
        end = min(offset + len(data), SIZE)
        if offset >= end:
            return change
        image[offset:end] = data[:end - offset]
        for field_offset, size, name in FIELDS:
            if field_offset < end and field_offset + size > offset:
                value = struct.unpack_from(_FORMATS[size], image, field_offset)[0]
                self._set(name, value, change)
        return change

    def _set(self, name: str, value: int, change: CommonChange) -> None:
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "guest_feature_select":
            self.driver_feature_select = value
        elif name == "guest_feature":
            self._set_driver_features(value)
        elif name == "msix_config":
            self.msix_config = self._vector(value)
        elif name == "device_status":
            self._set_status(value, change)
        elif name == "queue_select":
            self.queue_select = value
        else:
            self._set_queue(name, value, change)

    def _set_driver_features(self, value: int) -> None:
        select = self.driver_feature_select
        if select >= 2 or self.status & DeviceStatus.FEATURES_OK:
            return  # bits we do not know of (Linux writes 0 there), or after negotiation
        mask = 0xFFFF_FFFF << (32 * select)
        self.driver_features = self.driver_features & ~mask | value << (32 * select)

    def _set_status(self, value: int, change: CommonChange) -> None:
        if value == 0:
            change.reset = True
            return
        old = self.status
        self.status = (value & ~DeviceStatus.NEEDS_RESET) | (old & DeviceStatus.NEEDS_RESET)
        if self.status & DeviceStatus.FEATURES_OK and not old & DeviceStatus.FEATURES_OK:
            change.features_ok = True

    def _vector(self, value: int) -> int:
        return value if value < self.msix_vectors else NO_VECTOR

    def _set_queue(self, name: str, value: int, change: CommonChange) -> None:
        q = self.selected
        if q is None:
            return
        if name == "queue_msix_vector":
            q.msix_vector = self._vector(value)
        elif name == "queue_enable":
            if value == 1 and not q.enable:
                q.enable = True
                change.enabled.append(self.queue_select)
        elif q.enable:
            return  # spec 4.1.4.3.2: the driver does not change an enabled queue
        elif name == "queue_size":
            if 0 < value <= self.max_queue_size and not value & (value - 1):
                q.size = value
            else:
                log.warning("virtio: queue %d: ignoring queue_size %d (a power of 2 up to "
                            "%d)", self.queue_select, value, self.max_queue_size)
        elif name in _ADDRESS_HALVES:
            attr, shift = _ADDRESS_HALVES[name]
            kept = getattr(q, attr) & ~(0xFFFF_FFFF << shift)
            setattr(q, attr, kept | value << shift)
