"""A virtio-blk device (virtio spec 5.2 "Block Device") behind the virtio PCI transport
(viommu.endpoints.virtio_pci), backed by a raw image file, every DMA translated.

Python decides configuration and errors; the requestq is walked and served in C
(ext/blkq.pxi, ext/blk_requests.pxi) through the translation engine, on each kick. What the
device offers (spec 5.2.3):
- VIRTIO_F_VERSION_1 and VIRTIO_F_ACCESS_PLATFORM, both required: without
  ACCESS_PLATFORM Linux hands the device guest-physical addresses and never uses the DMA
  API (drivers/virtio/virtio_ring.c:vring_use_map_api), so the device refuses FEATURES_OK
  (spec 6.1: "A device MAY fail to operate further if VIRTIO_F_ACCESS_PLATFORM is not
  accepted"; the guest prints "virtio: device refuses features");
- VIRTIO_RING_F_INDIRECT_DESC (can be turned off), SEG_MAX, BLK_SIZE, FLUSH, DISCARD,
  WRITE_ZEROES, and RO for a read-only image.
One requestq of 256 entries, seg_max 254 (QEMU's rule: queue size - 2).

A request whose data does not translate completes with VIRTIO_BLK_S_IOERR, and the SMMUv3
event goes to the relay (the guest's virtio-iommu driver prints the fault); a ring that does
not translate, or a chain the spec forbids, sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

from viommu import _dataplane as hw
from viommu.dataplane.translation import Translator
from viommu.endpoints.virtio_common import QueueConfig
from viommu.endpoints.virtio_pci import VirtioPciFunction
from viommu.events.smmuv3 import EventRecord
from viommu.transport.vfio_user.dma import DmaMemory
from viommu.uapi import BlkFeature, RingFeature, TransportFeature

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2
PCI_CLASS_STORAGE_SCSI = 0x010000  # Linux pci_ids.h; QEMU's class for virtio-blk-pci
MAX_DISCARD_SECTORS = 0x3F_FFFF  # 2 GiB a request, QEMU's BDRV_REQUEST_MAX_SECTORS order
REQUIRED = (1 << TransportFeature.F_VERSION_1) | (1 << TransportFeature.F_ACCESS_PLATFORM)
DEFAULT_SIZE = 64 << 20


@dataclasses.dataclass(frozen=True)
class BlkOptions:
    image: str  # the raw image; created with `size` bytes when missing
    size: int = DEFAULT_SIZE  # bytes, for a new image
    read_only: bool = False
    indirect: bool = True  # offer VIRTIO_RING_F_INDIRECT_DESC
    discard: bool = True  # offer DISCARD and WRITE_ZEROES
    blk_size: int = 512  # the logical block size the driver uses (VIRTIO_BLK_F_BLK_SIZE)
    serial: str = ""  # GET_ID (default: viommu-blk-<endpoint>)
    msix: bool = True  # MSI-X; False: INTx (viommu.endpoints.virtio_pci says when)

    def __post_init__(self) -> None:
        if self.blk_size not in (512, 1024, 2048, 4096):
            raise ValueError(f"blk_size is 512, 1024, 2048 or 4096, not {self.blk_size}")
        if self.size <= 0 or self.size % hw.VIRTIO_BLK_SECTOR_SIZE:
            raise ValueError(f"size must be a positive multiple of 512 bytes, not {self.size}")
        if len(self.serial.encode()) > hw.VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial is at most {hw.VIRTIO_BLK_ID_BYTES} bytes")


def open_image(options: BlkOptions) -> tuple[int, int]:
    """(fd, size in bytes) of the backing file: an existing file as it is (its size rounded
    down to whole sectors), a missing one created sparse with `options.size` bytes."""
    flags = (os.O_RDONLY if options.read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(options.image, flags)
    except FileNotFoundError:
        if options.read_only:
            raise
        fd = os.open(options.image, flags | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, options.size)
        except OSError:
            os.close(fd)
            raise
    size = os.fstat(fd).st_size // hw.VIRTIO_BLK_SECTOR_SIZE * hw.VIRTIO_BLK_SECTOR_SIZE
    if size == 0:
        os.close(fd)
        raise ValueError(f"{options.image} holds no whole 512-byte sector")
    return fd, size


class VirtioBlk:
    """The block device (implements viommu.endpoints.virtio_pci.VirtioDevice). `transport`
    is set by the function that presents it; `translator` gives the engine and relays
    faults."""

    device_id = hw.VIRTIO_ID_BLOCK
    class_code = PCI_CLASS_STORAGE_SCSI
    num_queues = 1
    max_queue_size = QUEUE_SIZE
    config_size = hw.VIRTIO_BLK_CONFIG_SIZE

    def __init__(self, sid: int, options: BlkOptions, translator: Translator) -> None:
        self.sid = sid
        self.options = options
        self.translator = translator
        self.fd, self.size = open_image(options)
        self.queue = hw.BlkQueue(sid)
        serial = options.serial or f"viommu-blk-{sid:04x}"
        self.queue.set_backing(self.fd, self.size // hw.VIRTIO_BLK_SECTOR_SIZE,
                               options.read_only, serial.encode())
        self._config = self._config_bytes()
        self.interrupt: Callable[[int], None] = lambda index: None
        self.needs_reset: Callable[[str], None] = lambda why: None
        self.client_memory: Callable[[], DmaMemory | None] = lambda: None
        self.faults_relayed = 0
        self.faults_dropped = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _config_bytes(self) -> bytes:
        sectors_per_block = self.options.blk_size // hw.VIRTIO_BLK_SECTOR_SIZE
        discard = self.options.discard and not self.options.read_only
        return hw.encode_virtio_blk_config(
            self.size // hw.VIRTIO_BLK_SECTOR_SIZE, SEG_MAX, self.options.blk_size,
            max_discard_sectors=MAX_DISCARD_SECTORS if discard else 0,
            max_discard_seg=hw.BLK_MAX_DISCARD_SEGMENTS if discard else 0,
            discard_sector_alignment=sectors_per_block if discard else 0,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS if discard else 0,
            max_write_zeroes_seg=hw.BLK_MAX_DISCARD_SEGMENTS if discard else 0,
            write_zeroes_may_unmap=discard)

    # --- VirtioDevice -----------------------------------------------------------------------

    def device_features(self) -> int:
        bits = [TransportFeature.F_VERSION_1, TransportFeature.F_ACCESS_PLATFORM,
                BlkFeature.F_SEG_MAX, BlkFeature.F_BLK_SIZE, BlkFeature.F_FLUSH]
        if self.options.indirect:
            bits.append(RingFeature.F_INDIRECT_DESC)
        if self.options.read_only:
            bits.append(BlkFeature.F_RO)
        elif self.options.discard:
            bits += [BlkFeature.F_DISCARD, BlkFeature.F_WRITE_ZEROES]
        return sum(1 << bit for bit in bits)

    def refuse_features(self, accepted: int) -> str | None:
        if accepted & ~self.device_features():
            return f"bits {accepted & ~self.device_features():#x} were not offered"
        if accepted & REQUIRED != REQUIRED:
            return ("VIRTIO_F_VERSION_1 and VIRTIO_F_ACCESS_PLATFORM are required: every "
                    "DMA of this device goes through the vIOMMU")
        return None

    def config_read(self, offset: int, count: int) -> bytes:
        return self._config[offset:offset + count]

    def config_write(self, offset: int, data: bytes) -> None:
        pass  # nothing is writable without VIRTIO_BLK_F_CONFIG_WCE

    def queue_enabled(self, index: int, queue: QueueConfig, features: int) -> bool:
        self.queue.set_features(bool(features & 1 << RingFeature.F_INDIRECT_DESC),
                                bool(features & 1 << BlkFeature.F_DISCARD),
                                bool(features & 1 << BlkFeature.F_WRITE_ZEROES))
        self.queue.set_ring(queue.size, queue.desc, queue.driver, queue.device)
        if not self.queue.enable():
            log.error("virtio-blk %#x: %s", self.sid, self.queue.error_text())
            return False
        log.info("virtio-blk %#x: requestq of %d at desc %#x avail %#x used %#x", self.sid,
                 queue.size, queue.desc, queue.driver, queue.device)
        return True

    def driver_ok(self) -> None:
        self.notify(0)  # anything the driver queued before DRIVER_OK

    def reset(self) -> None:
        self.queue.reset()

    # --- the data path ------------------------------------------------------------------------

    def notify(self, index: int) -> None:
        """A kick: serve the requestq in C, then relay faults and interrupt."""
        engine = self.translator.engine
        if engine is None:
            self._serve_untranslated()
            return
        self._serve(engine, relay=True)

    def _serve(self, engine: hw.Engine, relay: bool) -> None:
        queue = self.queue
        queue.serve(engine)
        if queue.take_interrupt():
            self.interrupt(0)
        records, dropped = queue.take_faults()
        if records or dropped:
            if relay:
                self._relay(records, dropped)
            else:
                log.warning("virtio-blk %#x: %d DMA faults before the vIOMMU's driver "
                            "started (not relayed)", self.sid, len(records) + dropped)
        if queue.error:
            self.needs_reset(f"requestq: {queue.error_text()}")

    def _serve_untranslated(self) -> None:
        """Before the guest's virtio-iommu driver starts its device, the backend has no
        memory table and nothing is configured to translate: DMA goes untranslated through
        the guest RAM the vfio-user client mapped (DMA_MAP), as with QEMU's virtio-iommu
        boot-bypass. Firmware (SeaBIOS drives virtio-blk) reads the disk then, and would
        otherwise wait for its request forever."""
        memory = self.client_memory()
        if memory is None:
            return
        mem = hw.GuestMemory()
        try:
            for region in memory:
                if region.writable:  # guest RAM (ROM is mapped read-only)
                    mem.add_region(region.address, region.size, region.address,
                                   region.mapping)
            engine = hw.Engine(mem, iotlb_size=0)
            engine.set_stream_bypass(self.sid)
            self._serve(engine, relay=False)
        finally:
            mem.clear()  # let go of the mappings: DMA_UNMAP closes them

    def _relay(self, records: list[bytes], dropped: int) -> None:
        for raw in records:
            event = EventRecord.decode(raw)
            self.translator.fault(event)
            log.info("virtio-blk %#x: DMA fault %s at %#x (%s)", self.sid, event.name,
                     event.address, "read" if event.rnw else "write")
        self.faults_relayed += len(records)
        if dropped:
            self.faults_dropped += dropped
            log.warning("virtio-blk %#x: %d fault records dropped (more than %d in one "
                        "kick)", self.sid, dropped, len(records))

    def state(self) -> dict:
        q = self.queue
        return {"image": self.options.image, "size": self.size,
                "read_only": self.options.read_only, "queue_size": q.num,
                "enabled": q.enabled, "last_avail": q.last_avail, "used_idx": q.used_idx,
                "error": q.error_text() or None, "host_errno": q.host_errno,
                "faults_relayed": self.faults_relayed, "faults_dropped": self.faults_dropped,
                **q.counters()}


def blk_function(sid: int, options: BlkOptions, translator: Translator,
                 on_needs_reset: Callable[[str], None] = lambda why: None) -> VirtioPciFunction:
    """The block device as a virtio PCI function, ready to be served over vfio-user."""
    device = VirtioBlk(sid, options, translator)
    function = VirtioPciFunction(device, on_needs_reset, msix=options.msix)
    device.interrupt = function.queue_interrupt
    device.needs_reset = function.needs_reset
    device.client_memory = lambda: function.client.memory if function.client else None
    return function
