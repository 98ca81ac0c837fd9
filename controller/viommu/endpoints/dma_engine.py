"""The DMA-engine endpoint: a PCIe function whose BAR0 copies memory by DMA, served to QEMU's
vfio-user-pci over vfio-user.

Identity: vendor 0x1b36 (Red Hat, QEMU's devices), device 0x00f0, class 0x088000 ("other
system peripheral": the 0x0801 DMA-controller class promises 8237/ISA/EISA compatibility),
subsystem 0x1af4:0x1100 (QEMU's "emulated hardware" subsystem ID). 0x00f0 is not registered
in QEMU docs/specs/pci-ids.rst (assigned IDs run from 0x0001 up, 0x0015 at the time of
writing); it is kept far from them for use in test labs, and no Linux driver claims it.
Config space: PCI Express endpoint capability at 0x40, MSI (one vector, 64-bit) at 0x80,
no INTx, no MSI-X, no expansion ROM.

BAR0: 4 KiB of 32-bit non-prefetchable memory. Registers (little-endian; 8-, 16-, 32- and
64-bit accesses; bytes of read-only registers ignore writes; 0x40-0xfff read as zero):

  0x00  ID           RO  u32  0x414d4456 ("VDMA")
  0x04  VERSION      RO  u32  1
  0x08  SRC          RW  u64  source IOVA
  0x10  DST          RW  u64  destination IOVA
  0x18  LEN          RW  u32  bytes to copy, 1..MAX_LEN
  0x1c  PASID        RW  u32  bits 19:0 PASID, bit 31 PASID_VALID (the transfer carries the
                              PASID); bits 30:20 reserved, must be 0
  0x20  DOORBELL     WO  u32  write 1: run the transfer SRC -> DST; 0: nothing; reads 0
  0x24  STATUS       RO  u32  0 IDLE, 1 BUSY, 2 DONE, 3 ERROR
  0x28  ERROR        RO  u32  0 after DONE; after ERROR, the SMMUv3 event ID of the fault
                              (0x01-0xff: F_TRANSLATION 0x10, F_PERMISSION 0x13, C_BAD_STE
                              0x04, ...), or a device error 0x100 and up (ERR_* below)
  0x2c  COMPLETIONS  RO  u32  transfers finished (DONE or ERROR) since reset; wraps
  0x30  FAULT_ADDR   RO  u64  IOVA of the first byte the faulting access could not reach
  0x38  BYTES_DONE   RO  u32  bytes the last transfer copied (a fault stops the copy at the
                              faulting page: the pages before it are copied)
  0x3c  MAX_LEN      RO  u32  largest LEN accepted (1 MiB)

A transfer runs to its end inside the doorbell write, before the next message from the
client is served, so a read after the doorbell sees DONE or ERROR, unless it waits for a PRI
page response: then STATUS reads BUSY until the response comes (a doorbell meanwhile is
ignored). Every finished transfer raises MSI vector 0 (when the guest enabled MSI).
DMA needs Bus Master Enable in the command register, as on hardware.

The copy goes through a `DmaPort`: `GuestPhysicalDma` uses the client's DMA mappings as they
are (no translation); the engine work supplies one that translates through the vIOMMU.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Callable
from typing import Protocol

from viommu.endpoints.pci_config import MemoryBar, PciConfigSpace, PciIdentity
from viommu.events.smmuv3 import EventId
from viommu.transport.vfio_user.connection import VfioUserClient
from viommu.transport.vfio_user.dma import PAGE_SIZE, DmaAccessError, DmaMemory
from viommu.transport.vfio_user.messages import (
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    PciIrq,
    PciRegion,
)

log = logging.getLogger(__name__)

IDENTITY = PciIdentity(vendor_id=0x1B36, device_id=0x00F0, class_code=0x088000,
                       subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)
BAR0_SIZE = 0x1000
MAX_LEN = 1 << 20

# Register offsets in BAR0.
REG_ID = 0x00
REG_VERSION = 0x04
REG_SRC = 0x08
REG_DST = 0x10
REG_LEN = 0x18
REG_PASID = 0x1C
REG_DOORBELL = 0x20
REG_STATUS = 0x24
REG_ERROR = 0x28
REG_COMPLETIONS = 0x2C
REG_FAULT_ADDR = 0x30
REG_BYTES_DONE = 0x38
REG_MAX_LEN = 0x3C
REGISTERS_SIZE = 0x40

ID_VALUE = 0x414D4456  # "VDMA"
VERSION_VALUE = 1
PASID_VALID = 1 << 31
PASID_MASK = (1 << 20) - 1
DOORBELL_START = 1

STATUS_IDLE = 0
STATUS_BUSY = 1
STATUS_DONE = 2
STATUS_ERROR = 3

# Device errors (ERROR register), above the 8-bit SMMUv3 event IDs.
ERR_LENGTH = 0x101  # LEN is 0 or above MAX_LEN
ERR_PASID = 0x102  # reserved PASID register bits set
ERR_BUS_MASTER = 0x103  # Bus Master Enable is clear in the command register
ERR_DOORBELL = 0x104  # DOORBELL written with a value other than 0 or 1
ERR_RANGE = 0x105  # SRC or DST + LEN passes the top of the 64-bit space
ERR_NO_PATH = 0x106  # no DMA path: no client is connected
ERR_INTERNAL = 0x1FF  # the DMA port failed; see the server log

_STATUS_NAMES = {STATUS_IDLE: "IDLE", STATUS_BUSY: "BUSY", STATUS_DONE: "DONE",
                 STATUS_ERROR: "ERROR"}
# Bytes the guest may write (the doorbell is handled apart: it is write-only).
_WRITABLE = frozenset(range(REG_SRC, REG_DOORBELL))


@dataclasses.dataclass(frozen=True)
class DmaFault:
    """Why a transfer stopped: the SMMUv3 event the access raised, and where."""

    event_id: int
    address: int  # IOVA of the first byte not reached
    write: bool
    bytes_done: int  # bytes copied before the fault


class DmaPending:
    """A transfer waiting for something outside the engine (a PRI page response): the port
    calls `complete()` once with the outcome, possibly before `then()` subscribed (an answer
    given at once); STATUS reads BUSY until then."""

    def __init__(self) -> None:
        self._on_done: Callable[[DmaFault | None], None] | None = None
        self.done = False
        self._outcome: DmaFault | None = None

    def then(self, on_done: Callable[[DmaFault | None], None]) -> None:
        if self.done:
            on_done(self._outcome)
        else:
            self._on_done = on_done

    def complete(self, outcome: DmaFault | None) -> None:
        if self.done:
            raise RuntimeError("a pending DMA transfer completes once")
        self.done, self._outcome = True, outcome
        if self._on_done is not None:
            self._on_done(outcome)


class DmaPort(Protocol):
    """The endpoint's path to memory. `copy` moves `length` bytes from IOVA `src` to IOVA
    `dst` (with `pasid`, or without when None), page by page, and stops at the first page it
    cannot reach, returning why; None when everything was copied; DmaPending when the
    outcome comes later."""

    def copy(self, pasid: int | None, src: int, dst: int,
             length: int) -> DmaFault | DmaPending | None: ...


class GuestPhysicalDma:
    """IOVA = guest-physical address, through the DMA regions the client mapped; no
    translation, so the PASID is ignored. An address no region maps faults with
    F_TRANSLATION, a region mapped without the needed permission with F_PERMISSION."""

    def __init__(self, memory: DmaMemory) -> None:
        self.memory = memory

    def copy(self, pasid: int | None, src: int, dst: int, length: int) -> DmaFault | None:
        done = 0
        while done < length:
            s, d = src + done, dst + done
            n = min(length - done, PAGE_SIZE - s % PAGE_SIZE, PAGE_SIZE - d % PAGE_SIZE)
            try:
                self.memory.write(d, self.memory.read(s, n))
            except DmaAccessError as exc:
                event = EventId.F_PERMISSION if exc.mapped else EventId.F_TRANSLATION
                return DmaFault(event, exc.address, exc.write, done)
            done += n
        return None


class DmaEngine:
    """The BAR0 register block and the transfer it runs; knows nothing of vfio-user."""

    def __init__(self, max_length: int = MAX_LEN) -> None:
        self.max_length = max_length
        self.regs = bytearray(REGISTERS_SIZE)
        self.port: DmaPort | None = None
        self.bus_master: Callable[[], bool] = lambda: True
        self.interrupt: Callable[[], object] = lambda: None
        self.last_fault: DmaFault | None = None
        self.reset()

    def reset(self) -> None:
        self.regs[:] = bytes(REGISTERS_SIZE)
        self._put32(REG_ID, ID_VALUE)
        self._put32(REG_VERSION, VERSION_VALUE)
        self._put32(REG_MAX_LEN, self.max_length)
        self.last_fault = None

    # --- register access -----------------------------------------------------------------

    def read(self, offset: int, count: int) -> bytes:
        """Any bytes of BAR0; past the register block they read as zero."""
        data = bytes(self.regs[offset:offset + count])
        return data + bytes(count - len(data))

    def write(self, offset: int, data: bytes) -> None:
        doorbell = bytearray(4)
        rang = False
        for i, value in enumerate(data, offset):
            if i in _WRITABLE:
                self.regs[i] = value
            elif REG_DOORBELL <= i < REG_DOORBELL + 4:
                doorbell[i - REG_DOORBELL] = value
                rang = True
        if rang:
            self._doorbell(int.from_bytes(doorbell, "little"))

    def _get32(self, offset: int) -> int:
        return struct.unpack_from("<I", self.regs, offset)[0]

    def _get64(self, offset: int) -> int:
        return struct.unpack_from("<Q", self.regs, offset)[0]

    def _put32(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self.regs, offset, value & 0xFFFF_FFFF)

    def _put64(self, offset: int, value: int) -> None:
        struct.pack_into("<Q", self.regs, offset, value)

    @property
    def status(self) -> int:
        return self._get32(REG_STATUS)

    @property
    def error(self) -> int:
        return self._get32(REG_ERROR)

    @property
    def completions(self) -> int:
        return self._get32(REG_COMPLETIONS)

    # --- transfer ------------------------------------------------------------------------

    def _doorbell(self, value: int) -> None:
        if value == 0:
            return
        if self.status == STATUS_BUSY:
            log.warning("doorbell while a transfer waits for a page response: ignored")
            return
        self._put32(REG_STATUS, STATUS_BUSY)
        self._put32(REG_ERROR, 0)
        self._put64(REG_FAULT_ADDR, 0)
        self._put32(REG_BYTES_DONE, 0)
        self.last_fault = None
        if value != DOORBELL_START:
            self._finish(ERR_DOORBELL, f"doorbell value {value:#x} (write 1 to start)")
            return
        src, dst = self._get64(REG_SRC), self._get64(REG_DST)
        length, pasid_reg = self._get32(REG_LEN), self._get32(REG_PASID)
        problem = self._check(src, dst, length, pasid_reg)
        if problem is not None:
            self._finish(*problem)
            return
        pasid = pasid_reg & PASID_MASK if pasid_reg & PASID_VALID else None
        self._run(pasid, src, dst, length)

    def _check(self, src: int, dst: int, length: int, pasid_reg: int) -> tuple[int, str] | None:
        """A register value the engine refuses: (device error, why)."""
        if not self.bus_master():
            return ERR_BUS_MASTER, "Bus Master Enable is clear; set it in PCI_COMMAND"
        if not 0 < length <= self.max_length:
            return ERR_LENGTH, f"LEN {length:#x} is outside 1..{self.max_length:#x}"
        if pasid_reg & ~(PASID_VALID | PASID_MASK):
            return ERR_PASID, f"PASID register {pasid_reg:#x} sets reserved bits 30:20"
        if max(src, dst) + length > 1 << 64:
            return ERR_RANGE, f"SRC {src:#x} / DST {dst:#x} + LEN {length:#x} wraps"
        if self.port is None:
            return ERR_NO_PATH, "no DMA path (no client connected)"
        return None

    def _run(self, pasid: int | None, src: int, dst: int, length: int) -> None:
        try:
            outcome = self.port.copy(pasid, src, dst, length)
        except Exception:  # a bug in a port must not take the server down with it
            log.exception("DMA port %r failed on %#x -> %#x (+%#x)", self.port, src, dst, length)
            self._finish(ERR_INTERNAL, "the DMA port raised")
            return
        if isinstance(outcome, DmaPending):
            outcome.then(lambda fault: self._complete(length, fault))
            return  # BUSY until the port completes it
        self._complete(length, outcome)

    def _complete(self, length: int, fault: DmaFault | None) -> None:
        if fault is None:
            self._put32(REG_BYTES_DONE, length)
            self._finish(0, "")
            return
        self.last_fault = fault
        self._put64(REG_FAULT_ADDR, fault.address)
        self._put32(REG_BYTES_DONE, fault.bytes_done)
        self._finish(fault.event_id, f"{_event_name(fault.event_id)} on "
                                     f"{'write' if fault.write else 'read'} at "
                                     f"{fault.address:#x} after {fault.bytes_done:#x} bytes")

    def _finish(self, error: int, why: str) -> None:
        self._put32(REG_STATUS, STATUS_ERROR if error else STATUS_DONE)
        self._put32(REG_ERROR, error)
        self._put32(REG_COMPLETIONS, self.completions + 1)
        if error:
            log.warning("DMA transfer failed (ERROR=%#x): %s", error, why)
        self.interrupt()

    def state(self) -> dict:
        return {"status": _STATUS_NAMES.get(self.status, str(self.status)), "error": self.error,
                "completions": self.completions, "fault_addr": self._get64(REG_FAULT_ADDR),
                "bytes_done": self._get32(REG_BYTES_DONE)}


def _event_name(event_id: int) -> str:
    try:
        return EventId(event_id).name
    except ValueError:
        return f"event {event_id:#x}"


class DmaEndpoint:
    """The PCI function served over vfio-user: config space, BAR0 (the engine) and MSI.

    `dma` builds the engine's DmaPort when a client connects, from that client's DMA
    memory; the default copies guest-physical to guest-physical (GuestPhysicalDma)."""

    def __init__(self, dma: Callable[[DmaMemory], DmaPort] = GuestPhysicalDma,
                 max_length: int = MAX_LEN) -> None:
        self.config = PciConfigSpace(IDENTITY, {0: MemoryBar(BAR0_SIZE)}, msi_vectors=1)
        self.engine = DmaEngine(max_length)
        self.engine.bus_master = lambda: self.config.bus_master
        self.engine.interrupt = self._raise_msi
        self._dma = dma
        self.client: VfioUserClient | None = None
        self.resets = 0
        self.interrupts = 0

    # --- VfioUserDevice ------------------------------------------------------------------

    def device_flags(self) -> int:
        return VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET

    def region_info(self, index: int) -> tuple[int, int]:
        if index == PciRegion.BAR0:
            return VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE, BAR0_SIZE
        if index == PciRegion.CONFIG:
            return VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE, self.config.size
        return 0, 0

    def irq_info(self, index: int) -> tuple[int, int]:
        if index == PciIrq.MSI:
            return VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE, 1
        if index in (PciIrq.ERR, PciIrq.REQ):
            # Accepted so QEMU wires its error/request notifiers; the device never fires them.
            return VFIO_IRQ_INFO_EVENTFD, 1
        return VFIO_IRQ_INFO_EVENTFD, 0  # INTx, MSI-X: not implemented

    def irq_mask(self, index: int, changes: list[tuple[int, bool]]) -> None:
        pass  # no index is maskable

    def close(self) -> None:
        pass  # it holds nothing beyond its client's connection

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == PciRegion.CONFIG:
            return self.config.read(offset, count)
        return self.engine.read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == PciRegion.CONFIG:
            self.config.write(offset, data)
        else:
            self.engine.write(offset, data)

    def reset(self, reason: str) -> None:
        self.resets += 1
        self.config.reset()
        self.engine.reset()
        log.info("DMA endpoint reset (%s)", reason)

    def connected(self, client: VfioUserClient) -> None:
        self.client = client
        self.engine.port = self._dma(client.memory)

    def disconnected(self) -> None:
        self.client = None
        self.engine.port = None

    # --- interrupts ----------------------------------------------------------------------

    def _raise_msi(self) -> None:
        """MSI vector 0, when the guest enabled MSI and the client gave an eventfd."""
        if self.client is not None and self.config.msi_enabled:
            if self.client.interrupt(PciIrq.MSI, 0):
                self.interrupts += 1
