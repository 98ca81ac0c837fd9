"""A PCI Express endpoint's configuration space: type 0 header, memory BARs, a capability
list with the PCI Express capability (v2, endpoint), then MSI (64-bit), MSI-X and
vendor-specific capabilities as the function has them.

Writes behave as on hardware: each byte has a write mask (bits the function implements as
read/write), status bits are write-1-to-clear, read-only bits keep their value, and a BAR
implements only the address bits above its size, so writing all ones and reading back
gives the size mask. Register names and offsets are Linux include/uapi/linux/pci_regs.h's.

QEMU's vfio-pci front-end emulates some of this itself (BAR addresses, the MSI capability)
but still forwards every guest config write here ("write everything to VFIO, let it filter
out what we can't write"), so the model tracks the guest's view: command register, BARs,
MSI enable and message.
"""

from __future__ import annotations

import dataclasses
import struct

PCI_CONFIG_SPACE_SIZE = 0x100
PCIE_CONFIG_SPACE_SIZE = 0x1000

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_PARITY = 0x40
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS = 0x06
PCI_STATUS_INTERRUPT = 0x08
PCI_STATUS_CAP_LIST = 0x10
PCI_STATUS_PARITY = 0x100
PCI_STATUS_SIG_TARGET_ABORT = 0x800
PCI_STATUS_REC_TARGET_ABORT = 0x1000
PCI_STATUS_REC_MASTER_ABORT = 0x2000
PCI_STATUS_SIG_SYSTEM_ERROR = 0x4000
PCI_STATUS_DETECTED_PARITY = 0x8000
PCI_CLASS_REVISION = 0x08
PCI_CACHE_LINE_SIZE = 0x0C
PCI_HEADER_TYPE = 0x0E
PCI_HEADER_TYPE_NORMAL = 0
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_STD_NUM_BARS = 6

PCI_CAP_LIST_ID = 0
PCI_CAP_LIST_NEXT = 1
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11

PCI_MSI_FLAGS = 2
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSI_FLAGS_QMASK = 0x000E
PCI_MSI_FLAGS_QSIZE = 0x0070
PCI_MSI_FLAGS_64BIT = 0x0080
PCI_MSI_ADDRESS_LO = 4
PCI_MSI_ADDRESS_HI = 8
PCI_MSI_DATA_64 = 12

PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_QSIZE = 0x07FF  # Table Size - 1
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_FLAGS_BIRMASK = 0x7
PCI_CAP_MSIX_SIZEOF = 12
PCI_MSIX_ENTRY_SIZE = 16

PCI_EXP_FLAGS = 2
PCI_EXP_FLAGS_VERS_2 = 0x0002
PCI_EXP_TYPE_ENDPOINT = 0x0
PCI_EXP_DEVCAP = 4
PCI_EXP_DEVCAP_RBER = 0x00008000
PCI_EXP_DEVCTL = 8
PCI_EXP_DEVCTL_RELAX_EN = 0x0010
PCI_EXP_DEVCTL_NOSNOOP_EN = 0x0800
PCI_EXP_DEVCTL_READRQ_512B = 0x2000
PCI_EXP_DEVSTA = 10
PCI_EXP_LNKCAP = 12
PCI_EXP_LNKCAP_SLS_2_5GB = 0x00000001
PCI_EXP_LNKCAP_MLW_X1 = 0x00000010
PCI_EXP_LNKCTL = 16
PCI_EXP_LNKSTA = 18
PCI_EXP_LNKSTA_CLS_2_5GB = 0x0001
PCI_EXP_LNKSTA_NLW_X1 = 0x0010
PCI_EXP_LNKCAP2 = 0x2C
PCI_EXP_LNKCAP2_SLS_2_5GB = 0x00000002
PCI_EXP_LNKCTL2 = 0x30
PCI_EXP_LNKCTL2_TLS_2_5GT = 0x0001

# Read/write fields of the registers the model implements.
_COMMAND_WMASK = (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY
                  | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)  # no I/O BARs: IO is RO 0
_STATUS_W1C = (PCI_STATUS_PARITY | PCI_STATUS_SIG_TARGET_ABORT | PCI_STATUS_REC_TARGET_ABORT
               | PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_SIG_SYSTEM_ERROR
               | PCI_STATUS_DETECTED_PARITY)
_EXP_DEVCTL_WMASK = 0x79FF  # error reporting, relaxed ordering, MPS, ext tag, no snoop, MRRS
_EXP_DEVSTA_W1C = 0x000F  # correctable/non-fatal/fatal/unsupported-request detected
_EXP_LNKCTL_WMASK = 0x00CB  # ASPM control, RCB, common clock, extended synch
_MSI_FLAGS_WMASK = PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE
_MSI_SIZE = 0x18  # room for 64-bit MSI with per-vector masking (ours has none: 0x0E used)
_EXP_OFFSET = 0x40  # first capability, right after the type 0 header
_CAPS_OFFSET = 0x80  # the others, after the PCI Express capability (0x3C bytes in version 2)


@dataclasses.dataclass(frozen=True)
class MemoryBar:
    """A 32-bit memory BAR of `size` bytes (a power of two, at least 16)."""

    size: int
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if self.size < 16 or self.size & (self.size - 1) or self.size > 1 << 31:
            raise ValueError(f"a 32-bit memory BAR is a power of two in [16, 2 GiB], not "
                             f"{self.size:#x}")

    @property
    def type_bits(self) -> int:
        return PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0


@dataclasses.dataclass(frozen=True)
class MsixLayout:
    """Where an MSI-X function keeps its vector table and pending bit array (PCI Local Bus
    6.8.2): `table_size` vectors; offsets are within BARs `table_bar` and `pba_bar`."""

    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    def __post_init__(self) -> None:
        if not 1 <= self.table_size <= PCI_MSIX_FLAGS_QSIZE + 1:
            raise ValueError(f"MSI-X has 1..2048 vectors, not {self.table_size}")
        if self.table_offset % 8 or self.pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets are QWORD aligned")


@dataclasses.dataclass(frozen=True)
class VendorCapability:
    """A vendor-specific capability (ID 0x09): `body` is the whole structure, ID and next
    pointer included (the builder fills them), `wmask` its driver-writable bits."""

    body: bytes
    wmask: bytes = b""


@dataclasses.dataclass(frozen=True)
class PciIdentity:
    vendor_id: int
    device_id: int
    class_code: int  # base class << 16 | subclass << 8 | programming interface
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0


class PciConfigSpace:
    """Config space of one PCIe endpoint function (4 KiB; extended capabilities: none)."""

    def __init__(self, identity: PciIdentity, bars: dict[int, MemoryBar],
                 msi_vectors: int = 1, msix: MsixLayout | None = None,
                 vendor_caps: tuple[VendorCapability, ...] = (), intx_pin: int = 0) -> None:
        """`msi_vectors` 0: no MSI capability. `intx_pin` 1-4: INTA#-INTD#, 0: no INTx."""
        if not 0 <= intx_pin <= 4:
            raise ValueError(f"the interrupt pin is 0 (none) or 1-4 (INTA#-INTD#), not {intx_pin}")
        self.intx_pin = intx_pin
        if not set(bars) <= set(range(PCI_STD_NUM_BARS)):
            raise ValueError(f"BAR numbers are 0-5, not {sorted(bars)}")
        if msi_vectors not in (0, 1, 2, 4, 8, 16, 32):
            raise ValueError(f"MSI offers 1, 2, 4, ... 32 vectors, not {msi_vectors}")
        if msix is not None and not {msix.table_bar, msix.pba_bar} <= set(bars):
            raise ValueError("the MSI-X table and PBA must be in BARs the function has")
        self.identity = identity
        self.bars = dict(bars)
        self.size = PCIE_CONFIG_SPACE_SIZE
        self.config = bytearray(self.size)
        self.wmask = bytearray(self.size)
        self.w1cmask = bytearray(self.size)
        self.msi_offset = 0
        self.msix_offset = 0
        self.exp_offset = 0
        self.vendor_offsets: list[int] = []
        self._build_header()
        self._build_capabilities(msi_vectors, msix, vendor_caps)
        self._power_on = bytes(self.config)

    # --- layout ------------------------------------------------------------------------

    def _build_header(self) -> None:
        ident = self.identity
        self._set(PCI_VENDOR_ID, 2, ident.vendor_id)
        self._set(PCI_DEVICE_ID, 2, ident.device_id)
        self._set(PCI_COMMAND, 2, 0, wmask=_COMMAND_WMASK)
        self._set(PCI_STATUS, 2, PCI_STATUS_CAP_LIST, w1c=_STATUS_W1C)
        self._set(PCI_CLASS_REVISION, 4, ident.class_code << 8 | ident.revision)
        self._set(PCI_CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        self._set(PCI_HEADER_TYPE, 1, PCI_HEADER_TYPE_NORMAL)
        for n, bar in self.bars.items():
            # Address bits below the size read as zero: that is what sizing measures.
            self._set(PCI_BASE_ADDRESS_0 + 4 * n, 4, bar.type_bits,
                      wmask=~(bar.size - 1) & 0xFFFF_FFFF)
        self._set(PCI_SUBSYSTEM_VENDOR_ID, 2, ident.subsystem_vendor_id)
        self._set(PCI_SUBSYSTEM_ID, 2, ident.subsystem_id)
        # PCI_ROM_ADDRESS stays read-only zero: sizing it finds no expansion ROM.
        self._set(PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self._set(PCI_INTERRUPT_PIN, 1, self.intx_pin)  # 0: no INTx (MSI or MSI-X only)

    def _build_capabilities(self, msi_vectors: int, msix: MsixLayout | None,
                            vendor_caps: tuple[VendorCapability, ...]) -> None:
        """PCI Express first, then the others one after another, dword aligned."""
        builders = []
        if msi_vectors:
            builders.append((_MSI_SIZE, "msi_offset",
                             lambda pos, nxt: self._build_msi(pos, msi_vectors, nxt)))
        if msix is not None:
            builders.append((PCI_CAP_MSIX_SIZEOF, "msix_offset",
                             lambda pos, nxt: self._build_msix(pos, msix, nxt)))
        for cap in vendor_caps:
            builders.append((len(cap.body), None,
                             lambda pos, nxt, cap=cap: self._build_vendor(pos, cap, nxt)))
        positions, pos = [], _CAPS_OFFSET
        for size, _, _ in builders:
            positions.append(pos)
            pos += (size + 3) & ~3
        if pos > PCI_CONFIG_SPACE_SIZE:
            raise ValueError(f"capabilities need {pos:#x} bytes of config space, past 0x100")
        self.exp_offset = _EXP_OFFSET
        self._set(PCI_CAPABILITY_LIST, 1, self.exp_offset)
        self._build_express(self.exp_offset, next_cap=positions[0] if positions else 0)
        for i, (pos, (_, attr, build)) in enumerate(zip(positions, builders, strict=True)):
            build(pos, positions[i + 1] if i + 1 < len(positions) else 0)
            if attr:
                setattr(self, attr, pos)
            else:
                self.vendor_offsets.append(pos)

    def _build_express(self, pos: int, next_cap: int) -> None:
        """PCI Express capability v2 of an endpoint: x1 link at 2.5 GT/s, 128-byte payload.
        QEMU needs it to place the function on a pcie-root-port as an express endpoint."""
        self._set(pos + PCI_CAP_LIST_ID, 1, PCI_CAP_ID_EXP)
        self._set(pos + PCI_CAP_LIST_NEXT, 1, next_cap)
        self._set(pos + PCI_EXP_FLAGS, 2, PCI_EXP_TYPE_ENDPOINT << 4 | PCI_EXP_FLAGS_VERS_2)
        self._set(pos + PCI_EXP_DEVCAP, 4, PCI_EXP_DEVCAP_RBER)
        self._set(pos + PCI_EXP_DEVCTL, 2, PCI_EXP_DEVCTL_READRQ_512B | PCI_EXP_DEVCTL_RELAX_EN
                  | PCI_EXP_DEVCTL_NOSNOOP_EN, wmask=_EXP_DEVCTL_WMASK)
        self._set(pos + PCI_EXP_DEVSTA, 2, 0, w1c=_EXP_DEVSTA_W1C)
        self._set(pos + PCI_EXP_LNKCAP, 4, PCI_EXP_LNKCAP_MLW_X1 | PCI_EXP_LNKCAP_SLS_2_5GB)
        self._set(pos + PCI_EXP_LNKCTL, 2, 0, wmask=_EXP_LNKCTL_WMASK)
        self._set(pos + PCI_EXP_LNKSTA, 2, PCI_EXP_LNKSTA_NLW_X1 | PCI_EXP_LNKSTA_CLS_2_5GB)
        self._set(pos + PCI_EXP_LNKCAP2, 4, PCI_EXP_LNKCAP2_SLS_2_5GB)
        self._set(pos + PCI_EXP_LNKCTL2, 2, PCI_EXP_LNKCTL2_TLS_2_5GT)

    def _build_msi(self, pos: int, vectors: int, next_cap: int) -> None:
        """MSI with a 64-bit address and no per-vector masking."""
        mmc = (vectors.bit_length() - 1) << 1  # Multiple Message Capable, log2
        self._set(pos + PCI_CAP_LIST_ID, 1, PCI_CAP_ID_MSI)
        self._set(pos + PCI_CAP_LIST_NEXT, 1, next_cap)
        self._set(pos + PCI_MSI_FLAGS, 2, PCI_MSI_FLAGS_64BIT | mmc, wmask=_MSI_FLAGS_WMASK)
        self._set(pos + PCI_MSI_ADDRESS_LO, 4, 0, wmask=0xFFFF_FFFC)  # dword aligned
        self._set(pos + PCI_MSI_ADDRESS_HI, 4, 0, wmask=0xFFFF_FFFF)
        self._set(pos + PCI_MSI_DATA_64, 2, 0, wmask=0xFFFF)

    def _build_msix(self, pos: int, layout: MsixLayout, next_cap: int) -> None:
        """MSI-X: Enable and Function Mask writable; table and PBA where `layout` says."""
        self._set(pos + PCI_CAP_LIST_ID, 1, PCI_CAP_ID_MSIX)
        self._set(pos + PCI_CAP_LIST_NEXT, 1, next_cap)
        self._set(pos + PCI_MSIX_FLAGS, 2, layout.table_size - 1,
                  wmask=PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        self._set(pos + PCI_MSIX_TABLE, 4, layout.table_offset | layout.table_bar)
        self._set(pos + PCI_MSIX_PBA, 4, layout.pba_offset | layout.pba_bar)

    def _build_vendor(self, pos: int, cap: VendorCapability, next_cap: int) -> None:
        end = pos + len(cap.body)
        self.config[pos:end] = cap.body
        self.wmask[pos:pos + len(cap.wmask)] = cap.wmask
        self._set(pos + PCI_CAP_LIST_ID, 1, PCI_CAP_ID_VNDR)
        self._set(pos + PCI_CAP_LIST_NEXT, 1, next_cap)

    def _set(self, offset: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        for target, image in ((self.config, value), (self.wmask, wmask), (self.w1cmask, w1c)):
            target[offset:offset + size] = image.to_bytes(size, "little")

    # --- access ------------------------------------------------------------------------

    def read(self, offset: int, count: int) -> bytes:
        self._check(offset, count)
        return bytes(self.config[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a write the way the function's registers take it: masked bits change,
        write-1-to-clear bits clear, everything else keeps its value."""
        self._check(offset, len(data))
        for i, value in enumerate(data, offset):
            keep = self.config[i] & ~self.wmask[i]
            byte = keep | (value & self.wmask[i])
            self.config[i] = byte & ~(value & self.w1cmask[i]) & 0xFF
        self._clamp_msi_enable()

    def _clamp_msi_enable(self) -> None:
        """Multiple Message Enable cannot exceed Multiple Message Capable."""
        if not self.msi_offset:
            return
        flags = self.u16(self.msi_offset + PCI_MSI_FLAGS)
        mmc = (flags & PCI_MSI_FLAGS_QMASK) >> 1
        mme = (flags & PCI_MSI_FLAGS_QSIZE) >> 4
        if mme > mmc:
            flags = flags & ~PCI_MSI_FLAGS_QSIZE | mmc << 4
            self.config[self.msi_offset + PCI_MSI_FLAGS:
                        self.msi_offset + PCI_MSI_FLAGS + 2] = flags.to_bytes(2, "little")

    def _check(self, offset: int, count: int) -> None:
        if count <= 0 or offset < 0 or offset + count > self.size:
            raise ValueError(f"config access [{offset:#x}, +{count}) is outside the "
                             f"{self.size:#x}-byte config space")

    def reset(self) -> None:
        """Back to the power-on values (what a function level or conventional reset does)."""
        self.config[:] = self._power_on

    # --- decoded state ----------------------------------------------------------------------

    def u16(self, offset: int) -> int:
        return struct.unpack_from("<H", self.config, offset)[0]

    def u32(self, offset: int) -> int:
        return struct.unpack_from("<I", self.config, offset)[0]

    @property
    def command(self) -> int:
        return self.u16(PCI_COMMAND)

    @property
    def bus_master(self) -> bool:
        """Bus Master Enable: the function may issue DMA only while it is set."""
        return bool(self.command & PCI_COMMAND_MASTER)

    @property
    def intx_disabled(self) -> bool:
        """Interrupt Disable in the command register: the function must not assert INTx."""
        return bool(self.command & PCI_COMMAND_INTX_DISABLE)

    def set_interrupt_status(self, pending: bool) -> None:
        """Interrupt Status (read-only): the function's INTx message is pending."""
        status = self.u16(PCI_STATUS) & ~PCI_STATUS_INTERRUPT
        status |= PCI_STATUS_INTERRUPT if pending else 0
        self.config[PCI_STATUS:PCI_STATUS + 2] = status.to_bytes(2, "little")

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & PCI_COMMAND_MEMORY)

    def bar_address(self, n: int) -> int:
        bar = self.bars[n]
        return self.u32(PCI_BASE_ADDRESS_0 + 4 * n) & ~(bar.size - 1) & 0xFFFF_FFFF

    @property
    def msi_enabled(self) -> bool:
        return bool(self.msi_offset) and bool(
            self.u16(self.msi_offset + PCI_MSI_FLAGS) & PCI_MSI_FLAGS_ENABLE)

    @property
    def msix_enabled(self) -> bool:
        """MSI-X Enable (the function signals through its table, not INTx or MSI)."""
        return bool(self.msix_offset) and bool(
            self.u16(self.msix_offset + PCI_MSIX_FLAGS) & PCI_MSIX_FLAGS_ENABLE)

    @property
    def msi_message(self) -> tuple[int, int]:
        """(address, data) the guest programmed."""
        base = self.msi_offset
        address = self.u32(base + PCI_MSI_ADDRESS_HI) << 32 | self.u32(base + PCI_MSI_ADDRESS_LO)
        return address, self.u16(base + PCI_MSI_DATA_64)

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, ID) of each capability, walking the list as a driver does."""
        found, pos = [], self.config[PCI_CAPABILITY_LIST]
        while pos and len(found) < 48:
            found.append((pos, self.config[pos + PCI_CAP_LIST_ID]))
            pos = self.config[pos + PCI_CAP_LIST_NEXT]
        return found
