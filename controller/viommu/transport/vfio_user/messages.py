"""vfio-user wire format: header, command IDs, flags, payload codecs, and the <linux/vfio.h>
constants the payloads carry.

Sources: QEMU docs/interop/vfio-user.rst (the protocol), QEMU hw/vfio-user/protocol.h (what
QEMU's client really sends: protocol version 0.0, capability names, defaults) and Linux
include/uapi/linux/vfio.h (region/IRQ info structs, the fixed PCI region and IRQ indexes).
Every number appears here once, under the name those sources give it. All fields are
little-endian (the spec says host order; QEMU and this server are both x86-64).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import struct
from typing import Any

# --- header ------------------------------------------------------------------------------

HEADER = struct.Struct("<HHIII")  # message ID, command, size (with header), flags, error

VFIO_USER_REQUEST = 0x0
VFIO_USER_REPLY = 0x1
VFIO_USER_TYPE = 0xF
VFIO_USER_NO_REPLY = 0x10
VFIO_USER_ERROR = 0x20


class Command(enum.IntEnum):
    """Message command IDs (vfio-user.rst "Commands"; 14 is QEMU's DIRTY_PAGES)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11  # server -> client; this server mmaps client memory instead
    DMA_WRITE = 12  # server -> client
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


def command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"UNKNOWN({command})"


# --- VERSION -----------------------------------------------------------------------------

VFIO_USER_MAJOR_VER = 0
VFIO_USER_MINOR_VER = 0

VFIO_USER_CAP = "capabilities"
VFIO_USER_CAP_MAX_FDS = "max_msg_fds"
VFIO_USER_CAP_MAX_XFER = "max_data_xfer_size"
VFIO_USER_CAP_PGSIZES = "pgsizes"
VFIO_USER_CAP_MAP_MAX = "max_dma_maps"
VFIO_USER_CAP_MIGR = "migration"
VFIO_USER_CAP_MULTI = "write_multiple"
VFIO_USER_CAP_TWIN_SOCKET = "twin_socket"

VFIO_USER_DEF_MAX_FDS = 8
VFIO_USER_MAX_MAX_FDS = 16
VFIO_USER_DEF_MAX_XFER = 1024 * 1024
VFIO_USER_MAX_MAX_XFER = 64 * 1024 * 1024
VFIO_USER_DEF_PGSIZE = 4096
VFIO_USER_DEF_MAP_MAX = 65535

_VERSION = struct.Struct("<HH")

# --- REGION_WRITE_MULTI ------------------------------------------------------------------

VFIO_USER_MULTI_DATA = 8
VFIO_USER_MULTI_MAX = 200
_WR_CNT = struct.Struct("<Q")
_WR_ONE = struct.Struct(f"<QII{VFIO_USER_MULTI_DATA}s")  # offset, region, count, data

# --- <linux/vfio.h> ----------------------------------------------------------------------

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = (VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL
                               | VFIO_IRQ_SET_DATA_EVENTFD)
VFIO_IRQ_SET_ACTION_TYPE_MASK = (VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK
                                 | VFIO_IRQ_SET_ACTION_TRIGGER)

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1


class PciRegion(enum.IntEnum):
    """VFIO_PCI_*_REGION_INDEX: the fixed region numbering of a vfio-pci device."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


VFIO_PCI_NUM_REGIONS = 9


class PciIrq(enum.IntEnum):
    """VFIO_PCI_*_IRQ_INDEX: the fixed interrupt numbering of a vfio-pci device."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


VFIO_PCI_NUM_IRQS = 5

# --- messages ----------------------------------------------------------------------------


class ProtocolError(ValueError):
    """A request this server refuses; `errno` goes into the error reply, the text into the
    log and says what was wrong."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


@dataclasses.dataclass
class Message:
    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int]

    @property
    def type(self) -> int:
        return self.flags & VFIO_USER_TYPE

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & VFIO_USER_NO_REPLY)

    @property
    def name(self) -> str:
        return command_name(self.command)


def pack_reply(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(msg_id, command, HEADER.size + len(payload), VFIO_USER_REPLY, 0) + payload


def pack_error(msg_id: int, command: int, err: int) -> bytes:
    """An error reply is the header alone (vfio-user.rst "Header")."""
    return HEADER.pack(msg_id, command, HEADER.size, VFIO_USER_REPLY | VFIO_USER_ERROR, err)


def pack_request(msg_id: int, command: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A client-side request (used by tests and tools that play the client)."""
    return HEADER.pack(msg_id, command, HEADER.size + len(payload),
                       VFIO_USER_REQUEST | flags, 0) + payload


def expect_size(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise ProtocolError(f"{what} payload is {len(payload)} bytes, expected {size}")


# --- payload codecs ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Version:
    major: int
    minor: int
    capabilities: dict[str, Any] | None  # the "capabilities" object; None without JSON


def parse_version(payload: bytes) -> Version:
    if len(payload) < _VERSION.size:
        raise ProtocolError(f"VERSION payload of {len(payload)} bytes has no version numbers")
    major, minor = _VERSION.unpack_from(payload)
    text = payload[_VERSION.size:].split(b"\0", 1)[0]
    if not text:
        return Version(major, minor, None)
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"VERSION capabilities are not JSON: {exc}") from None
    caps = document.get(VFIO_USER_CAP, {}) if isinstance(document, dict) else None
    if not isinstance(caps, dict):
        raise ProtocolError(f"VERSION data must be an object with a {VFIO_USER_CAP!r} object, "
                            f"got {text[:80]!r}")
    return Version(major, minor, caps)


def pack_version(major: int, minor: int, capabilities: dict[str, Any] | None) -> bytes:
    """Version numbers, then compact JSON with its terminating NUL (QEMU checks for it)."""
    if capabilities is None:
        return _VERSION.pack(major, minor)
    text = json.dumps({VFIO_USER_CAP: capabilities}, separators=(",", ":"))
    return _VERSION.pack(major, minor) + text.encode() + b"\0"


@dataclasses.dataclass(frozen=True)
class DmaMap:
    """struct vfio_user_dma_map (from vfio_iommu_type1_dma_map)."""

    argsz: int
    flags: int
    offset: int  # in the fd
    address: int  # DMA address (IOVA; guest-physical without a vIOMMU in QEMU)
    size: int

    STRUCT = struct.Struct("<IIQQQ")

    @classmethod
    def unpack(cls, payload: bytes) -> DmaMap:
        expect_size(payload, cls.STRUCT.size, "DMA_MAP")
        return cls(*cls.STRUCT.unpack(payload))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.offset, self.address, self.size)


@dataclasses.dataclass(frozen=True)
class DmaUnmap:
    """struct vfio_user_dma_unmap (from vfio_iommu_type1_dma_unmap)."""

    argsz: int
    flags: int
    address: int
    size: int

    STRUCT = struct.Struct("<IIQQ")

    @classmethod
    def unpack(cls, payload: bytes) -> DmaUnmap:
        expect_size(payload, cls.STRUCT.size, "DMA_UNMAP")
        return cls(*cls.STRUCT.unpack(payload))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.address, self.size)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """struct vfio_device_info (the 16-byte part vfio-user carries)."""

    argsz: int
    flags: int
    num_regions: int
    num_irqs: int

    STRUCT = struct.Struct("<IIII")

    @classmethod
    def unpack(cls, payload: bytes) -> DeviceInfo:
        expect_size(payload, cls.STRUCT.size, "DEVICE_GET_INFO")
        return cls(*cls.STRUCT.unpack(payload))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)


@dataclasses.dataclass(frozen=True)
class RegionInfo:
    """struct vfio_region_info."""

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int

    STRUCT = struct.Struct("<IIIIQQ")

    @classmethod
    def unpack(cls, payload: bytes) -> RegionInfo:
        expect_size(payload, cls.STRUCT.size, "DEVICE_GET_REGION_INFO")
        return cls(*cls.STRUCT.unpack(payload))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.index, self.cap_offset, self.size,
                                self.offset)


@dataclasses.dataclass(frozen=True)
class IrqInfo:
    """struct vfio_irq_info."""

    argsz: int
    flags: int
    index: int
    count: int

    STRUCT = struct.Struct("<IIII")

    @classmethod
    def unpack(cls, payload: bytes) -> IrqInfo:
        expect_size(payload, cls.STRUCT.size, "DEVICE_GET_IRQ_INFO")
        return cls(*cls.STRUCT.unpack(payload))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.index, self.count)


@dataclasses.dataclass(frozen=True)
class IrqSet:
    """struct vfio_irq_set; `data` is the DATA_BOOL array (eventfds travel as SCM_RIGHTS)."""

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""

    STRUCT = struct.Struct("<IIIII")

    @classmethod
    def unpack(cls, payload: bytes) -> IrqSet:
        if len(payload) < cls.STRUCT.size:
            raise ProtocolError(f"DEVICE_SET_IRQS payload of {len(payload)} bytes is shorter "
                                f"than struct vfio_irq_set ({cls.STRUCT.size})")
        return cls(*cls.STRUCT.unpack_from(payload), data=payload[cls.STRUCT.size:])

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.index, self.start,
                                self.count) + self.data

    @property
    def data_type(self) -> int:
        return self.flags & VFIO_IRQ_SET_DATA_TYPE_MASK

    @property
    def action(self) -> int:
        return self.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK


@dataclasses.dataclass(frozen=True)
class RegionAccess:
    """REGION_READ / REGION_WRITE: the request, and the reply (with data for a read)."""

    offset: int
    region: int
    count: int
    data: bytes = b""

    STRUCT = struct.Struct("<QII")

    @classmethod
    def unpack(cls, payload: bytes, what: str) -> RegionAccess:
        if len(payload) < cls.STRUCT.size:
            raise ProtocolError(f"{what} payload of {len(payload)} bytes has no "
                                f"offset/region/count")
        return cls(*cls.STRUCT.unpack_from(payload), data=payload[cls.STRUCT.size:])

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.offset, self.region, self.count) + self.data


def parse_write_multi(payload: bytes) -> list[RegionAccess]:
    """REGION_WRITE_MULTI: wr_cnt, then wr_cnt 24-byte writes of at most 8 bytes each."""
    if len(payload) < _WR_CNT.size:
        raise ProtocolError("REGION_WRITE_MULTI payload has no wr_cnt")
    (count,) = _WR_CNT.unpack_from(payload)
    if count > VFIO_USER_MULTI_MAX or len(payload) != _WR_CNT.size + count * _WR_ONE.size:
        raise ProtocolError(f"REGION_WRITE_MULTI says {count} writes (limit "
                            f"{VFIO_USER_MULTI_MAX}) in {len(payload)} bytes")
    writes = []
    for i in range(count):
        offset, region, size, data = _WR_ONE.unpack_from(payload, _WR_CNT.size + i * _WR_ONE.size)
        if size > VFIO_USER_MULTI_DATA:
            raise ProtocolError(f"REGION_WRITE_MULTI write {i} has count {size} (limit "
                                f"{VFIO_USER_MULTI_DATA})")
        writes.append(RegionAccess(offset, region, size, data[:size]))
    return writes


def pack_write_multi(writes: list[RegionAccess]) -> bytes:
    return _WR_CNT.pack(len(writes)) + b"".join(
        _WR_ONE.pack(w.offset, w.region, w.count, w.data) for w in writes)


def pack_wr_cnt(count: int) -> bytes:
    return _WR_CNT.pack(count)
