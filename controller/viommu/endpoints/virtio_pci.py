"""The modern virtio PCI transport (virtio spec 4.1 "Virtio Over PCI Bus"), served to QEMU's
vfio-user-pci: a non-transitional function (device ID 0x1040 + the virtio device ID,
revision 1) whose vendor-specific capabilities place the configuration structures in BAR0:

  BAR0 (16 KiB, 32-bit memory, not mmappable):
    0x0000  common configuration (struct virtio_pci_modern_common_cfg, 0x40 bytes)
    0x1000  ISR status (1 byte, cleared by reading)
    0x2000  device configuration (the device's, e.g. struct virtio_blk_config)
    0x3000  notifications: queue q at 0x3000 + 4 * q (notify_off_multiplier 4)
  BAR2 (4 KiB): the MSI-X table (0x000) and pending bit array (0x800)

Capabilities after the PCI Express one: MSI-X (one vector for configuration changes and
one per queue), then COMMON, NOTIFY, ISR, DEVICE and the PCI_CFG window (spec 4.1.4.9).
Linux's virtio_pci uses MSI-X, else INTx, never MSI (drivers/virtio/virtio_pci_common.c:
vp_find_vqs). QEMU emulates the MSI-X table itself and signals the eventfds the server gets
with SET_IRQS; PBA reads reach the server. No region is mmappable: one mmappable region
would make QEMU wait for a reply to every BAR write (hw/vfio-user:
vfio_user_disable_posted_writes), and each queue notification is then one posted
REGION_WRITE.

Without MSI-X (`msix=False`) the function has INTA# instead, level-triggered and
automasked as vfio's INTx is: the eventfd fires once, and the line is signalled again
after the client's UNMASK (QEMU sends it at the first BAR access after the interrupt,
hw/vfio/pci.c:vfio_pci_intx_eoi) if the ISR is still set once that access is done. QEMU
up to 11.1 aborts when it unplugs a vfio-user device with MSI-X (its
vfio_user_msix_teardown deletes a subregion already gone; the upstream patch is
"vfio-user: Do not delete the subregion"), so disks meant to be unplugged there use INTx.

The device behind the transport implements `VirtioDevice`; the transport owns the common
configuration, feature negotiation, interrupts and DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Callable
from typing import Protocol

from viommu import _dataplane as hw
from viommu.endpoints.pci_config import (
    PCI_MSIX_ENTRY_SIZE,
    MemoryBar,
    MsixLayout,
    PciConfigSpace,
    PciIdentity,
    VendorCapability,
)
from viommu.endpoints.virtio_common import CommonConfig, QueueConfig
from viommu.transport.vfio_user.connection import VfioUserClient
from viommu.transport.vfio_user.messages import (
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    PciIrq,
    PciRegion,
)
from viommu.uapi import DeviceStatus, VirtioPciCapType

log = logging.getLogger(__name__)

BAR0_SIZE = 0x4000
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_OFF_MULTIPLIER = 4
NOTIFY_SIZE = 0x1000
MSIX_BAR, MSIX_BAR_SIZE = 2, 0x1000
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x000, 0x800
# Linux: PCI_CLASS_STORAGE_SCSI for virtio-blk (QEMU hw/virtio/virtio-blk-pci.c); other
# devices name theirs. Subsystem: QEMU's defaults for virtio devices.
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = hw.VIRTIO_PCI_VENDOR_ID, 0x1100
_RW = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE


class VirtioDevice(Protocol):
    """A virtio device type behind the PCI transport (its section of spec 5)."""

    device_id: int
    class_code: int
    num_queues: int
    max_queue_size: int
    config_size: int

    def device_features(self) -> int: ...
    def refuse_features(self, accepted: int) -> str | None: ...  # None: FEATURES_OK
    def config_read(self, offset: int, count: int) -> bytes: ...
    def config_write(self, offset: int, data: bytes) -> None: ...
    def queue_enabled(self, index: int, queue: QueueConfig, features: int) -> bool: ...
    def driver_ok(self) -> None: ...
    def notify(self, index: int) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...  # the function is gone: let go of what it holds


class VirtioPciFunction:
    """A virtio device as a PCI function served over vfio-user (see the module docstring).
    Implements viommu.transport.vfio_user.connection.VfioUserDevice."""

    def __init__(self, device: VirtioDevice,
                 on_needs_reset: Callable[[str], None] = lambda why: None,
                 msix: bool = True) -> None:
        """`msix` False: INTA# instead of MSI-X (see the module docstring)."""
        self.device = device
        self.on_needs_reset = on_needs_reset
        self.msix_vectors = device.num_queues + 1 if msix else 0  # config + one per queue
        identity = PciIdentity(vendor_id=hw.VIRTIO_PCI_VENDOR_ID,
                               device_id=hw.VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device.device_id,
                               class_code=device.class_code,
                               revision=hw.VIRTIO_PCI_MODERN_REVISION,
                               subsystem_vendor_id=SUBSYSTEM_VENDOR_ID,
                               subsystem_id=SUBSYSTEM_ID)
        bars = {0: MemoryBar(BAR0_SIZE)}
        if msix:
            bars[MSIX_BAR] = MemoryBar(MSIX_BAR_SIZE)
        self.config = PciConfigSpace(
            identity, bars, msi_vectors=0,
            msix=MsixLayout(self.msix_vectors, MSIX_BAR, MSIX_TABLE_OFFSET, MSIX_BAR,
                            MSIX_PBA_OFFSET) if msix else None,
            vendor_caps=self._virtio_caps(device.config_size), intx_pin=0 if msix else 1)
        self.pci_cfg_cap = self.config.vendor_offsets[-1]
        self.common = CommonConfig(device.device_features(), device.num_queues,
                                   device.max_queue_size, self.msix_vectors)
        self.msix_table = bytearray(self.msix_vectors * PCI_MSIX_ENTRY_SIZE)
        self.isr = 0
        self.intx_masked = False  # the client's mask (automasked when signalled)
        self._unmasked = False  # UNMASK came: look at the ISR after the next access
        self.client: VfioUserClient | None = None
        self.resets = 0
        self.interrupts = 0

    @staticmethod
    def _virtio_caps(config_size: int) -> tuple[VendorCapability, ...]:
        cap = hw.encode_virtio_pci_cap
        window = bytearray(hw.VIRTIO_PCI_CFG_CAP_SIZE)
        # PCI_CFG: bar, offset, length and pci_cfg_data are the driver's (spec 4.1.4.9)
        window[hw.VIRTIO_PCI_CAP_BAR] = 0xFF
        window[hw.VIRTIO_PCI_CAP_OFFSET:] = b"\xff" * (len(window) - hw.VIRTIO_PCI_CAP_OFFSET)
        return (
            VendorCapability(cap(VirtioPciCapType.COMMON_CFG, 0, COMMON_OFFSET,
                                 hw.VIRTIO_PCI_MODERN_COMMON_CFG_SIZE)),
            VendorCapability(cap(VirtioPciCapType.NOTIFY_CFG, 0, NOTIFY_OFFSET, NOTIFY_SIZE,
                                 NOTIFY_OFF_MULTIPLIER)),
            VendorCapability(cap(VirtioPciCapType.ISR_CFG, 0, ISR_OFFSET, 1)),
            VendorCapability(cap(VirtioPciCapType.DEVICE_CFG, 0, DEVICE_OFFSET, config_size)),
            VendorCapability(cap(VirtioPciCapType.PCI_CFG, 0, 0, 0), bytes(window)),
        )

    # --- VfioUserDevice ------------------------------------------------------------------

    def device_flags(self) -> int:
        return VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET

    def region_info(self, index: int) -> tuple[int, int]:
        if index == PciRegion.BAR0:
            return _RW, BAR0_SIZE
        if index == MSIX_BAR and self.msix_vectors:
            return _RW, MSIX_BAR_SIZE
        if index == PciRegion.CONFIG:
            return _RW, self.config.size
        return 0, 0

    def irq_info(self, index: int) -> tuple[int, int]:
        if index == PciIrq.MSIX:
            # Without NORESIZE QEMU binds each vector as the guest unmasks it.
            return VFIO_IRQ_INFO_EVENTFD, self.msix_vectors
        if index == PciIrq.INTX and self.config.intx_pin:
            return VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED, 1
        if index in (PciIrq.ERR, PciIrq.REQ):
            return VFIO_IRQ_INFO_EVENTFD, 1
        return VFIO_IRQ_INFO_EVENTFD, 0  # no MSI

    def irq_mask(self, index: int, changes: list[tuple[int, bool]]) -> None:
        if index != PciIrq.INTX:
            return
        for _, masked in changes:
            self.intx_masked = masked
            self._unmasked = not masked

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == PciRegion.CONFIG:
            data = self._config_read(offset, count)
        elif index == MSIX_BAR:
            data = self._msix_read(offset, count)
        else:
            data = self.bar0_read(offset, count)
        if self._unmasked:
            self._after_unmask()
        return data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == PciRegion.BAR0:
            if offset >= NOTIFY_OFFSET:  # the hot path: one posted write per kick
                self._notify(offset - NOTIFY_OFFSET)
            else:
                self.bar0_write(offset, data)
        elif index == PciRegion.CONFIG:
            self._config_write(offset, data)
        elif index == MSIX_BAR and offset < len(self.msix_table):
            self.msix_table[offset:offset + len(data)] = data[:len(self.msix_table) - offset]
        if self._unmasked:
            self._after_unmask()

    def reset(self, reason: str) -> None:
        """A function-level reset: config space and the virtio device both."""
        self.config.reset()
        self.intx_masked = self._unmasked = False
        self._virtio_reset(reason)

    def connected(self, client: VfioUserClient) -> None:
        self.client = client

    def close(self) -> None:
        """The endpoint is gone: the device lets go of what it holds (its image)."""
        self.device.close()

    def disconnected(self) -> None:
        self.client = None

    # --- BAR0 --------------------------------------------------------------------------

    def bar0_read(self, offset: int, count: int) -> bytes:
        if offset < ISR_OFFSET:
            return self.common.read(offset, count)
        if offset == ISR_OFFSET:
            isr, self.isr = self.isr, 0  # spec 4.1.4.5: reading clears it (INTx deasserts)
            self.config.set_interrupt_status(False)
            return bytes([isr]) + bytes(count - 1)
        if DEVICE_OFFSET <= offset < NOTIFY_OFFSET:
            data = self.device.config_read(offset - DEVICE_OFFSET, count)
            return data + bytes(count - len(data))
        return bytes(count)

    def bar0_write(self, offset: int, data: bytes) -> None:
        if offset < ISR_OFFSET:
            self._common_write(offset, data)
        elif DEVICE_OFFSET <= offset < NOTIFY_OFFSET:
            self.device.config_write(offset - DEVICE_OFFSET, data)
        elif offset >= NOTIFY_OFFSET:
            self._notify(offset - NOTIFY_OFFSET)

    def _notify(self, offset: int) -> None:
        index = offset // NOTIFY_OFF_MULTIPLIER
        status = self.common.status
        if (index < self.device.num_queues and self.common.queues[index].enable
                and status & DeviceStatus.DRIVER_OK and not status & DeviceStatus.NEEDS_RESET
                and self.config.bus_master):
            self.device.notify(index)

    def _common_write(self, offset: int, data: bytes) -> None:
        common = self.common
        before = common.status
        change = common.write(offset, data)
        if change.reset:
            self._virtio_reset("the driver wrote 0 to device_status")
            return
        if change.features_ok:
            why = self.device.refuse_features(common.driver_features)
            if why is not None:
                common.status &= ~DeviceStatus.FEATURES_OK  # spec 3.1.1 step 6
                log.warning("virtio: refusing the driver's features %#x: %s",
                            common.driver_features, why)
        for index in change.enabled:
            if not self.device.queue_enabled(index, common.queues[index],
                                             common.driver_features):
                self.needs_reset(f"queue {index} cannot be enabled")
        if common.status & DeviceStatus.DRIVER_OK and not before & DeviceStatus.DRIVER_OK:
            self.device.driver_ok()

    def _virtio_reset(self, reason: str) -> None:
        self.resets += 1
        self.common.reset()
        self.isr = 0
        self.config.set_interrupt_status(False)
        self.device.reset()
        log.info("virtio device reset (%s)", reason)

    # --- interrupts ----------------------------------------------------------------------

    def queue_interrupt(self, index: int) -> None:
        """A used-buffer notification for queue `index` (spec 4.1.5.4): its MSI-X vector,
        else the ISR's queue bit and INTx."""
        if self.config.msix_enabled:
            self._signal(PciIrq.MSIX, self.common.queues[index].msix_vector)
        elif self.config.intx_pin:
            self.isr |= hw.VIRTIO_PCI_ISR_QUEUE
            self._assert_intx()

    def config_interrupt(self) -> None:
        """A configuration change notification (spec 4.1.5.3): ISR bit 1 first, always."""
        self.isr |= hw.VIRTIO_PCI_ISR_CONFIG
        if self.config.msix_enabled:
            self._signal(PciIrq.MSIX, self.common.msix_config)
        elif self.config.intx_pin:
            self._assert_intx()

    def _assert_intx(self) -> None:
        """The line is high while the ISR is set; signalled unless masked, then automasked."""
        self.config.set_interrupt_status(self.isr != 0)
        if self.isr and not self.intx_masked and not self.config.intx_disabled:
            self.intx_masked = True
            self._signal(PciIrq.INTX, 0)

    def _after_unmask(self) -> None:
        self._unmasked = False
        if self.isr:
            self._assert_intx()

    def _signal(self, index: int, vector: int) -> None:
        if vector != hw.VIRTIO_MSI_NO_VECTOR and self.client is not None:
            if self.client.interrupt(index, vector):
                self.interrupts += 1

    def needs_reset(self, why: str) -> None:
        """Spec 2.1.2: DEVICE_NEEDS_RESET, and a configuration change notification when
        DRIVER_OK is set; the device stays so until the driver resets it."""
        if self.common.status & DeviceStatus.NEEDS_RESET:
            return
        self.common.status |= DeviceStatus.NEEDS_RESET
        log.error("virtio device needs reset: %s", why)
        self.on_needs_reset(why)
        if self.common.status & DeviceStatus.DRIVER_OK:
            self.config_interrupt()

    # --- config space: the PCI_CFG window, and MSI-X -------------------------------------------

    def _config_read(self, offset: int, count: int) -> bytes:
        data = self.config.read(offset, count)
        window = self.pci_cfg_cap + hw.VIRTIO_PCI_CFG_DATA_OFFSET
        if offset < window + 4 and offset + count > window:
            bar, off, length = self._window()
            if length:
                value = (self.bar0_read(off, length) if bar == 0 else bytes(length))
                image = bytearray(self.config.config[window:window + 4])
                image[:length] = value
                start = max(offset, window)
                data = bytearray(data)
                data[start - offset:min(offset + count, window + 4) - offset] = (
                    image[start - window:min(offset + count, window + 4) - window])
                data = bytes(data)
        return data

    def _config_write(self, offset: int, data: bytes) -> None:
        self.config.write(offset, data)
        window = self.pci_cfg_cap + hw.VIRTIO_PCI_CFG_DATA_OFFSET
        if offset < window + 4 and offset + len(data) > window:
            bar, off, length = self._window()
            if length and bar == 0:
                self.bar0_write(off, bytes(self.config.config[window:window + length]))

    def _window(self) -> tuple[int, int, int]:
        """The PCI_CFG capability's access: (bar, offset, length); length 0 when the
        driver set one the spec does not allow (1, 2 or 4 bytes, aligned, in BAR0)."""
        cap = self.pci_cfg_cap
        bar = self.config.config[cap + hw.VIRTIO_PCI_CAP_BAR]
        off, length = struct.unpack_from("<II", self.config.config, cap + hw.VIRTIO_PCI_CAP_OFFSET)
        if length not in (1, 2, 4) or off % length or off + length > BAR0_SIZE:
            return bar, off, 0
        return bar, off, length

    def _msix_read(self, offset: int, count: int) -> bytes:
        if offset < len(self.msix_table):
            data = bytes(self.msix_table[offset:offset + count])
            return data + bytes(count - len(data))
        return bytes(count)  # the PBA: QEMU keeps pending bits of masked vectors itself

    # --- state ----------------------------------------------------------------------------------

    def state(self) -> dict:
        common = self.common
        return {"status": DeviceStatus(common.status).name or "0" if common.status else "0",
                "device_features": f"{common.device_features:#x}",
                "driver_features": f"{common.driver_features:#x}",
                "interrupts_by": "msix" if self.msix_vectors else "intx",
                "msix_enabled": self.config.msix_enabled, "resets": self.resets,
                "interrupts": self.interrupts,
                "queues": [dataclasses.asdict(q) for q in common.queues]}
