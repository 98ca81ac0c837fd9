"""vhost-user wire format (QEMU docs/interop/vhost-user.rst): IDs, flags, payload codecs."""

from __future__ import annotations

import dataclasses
import enum
import struct

HEADER = struct.Struct("<III")  # request, flags, size
VHOST_USER_VERSION = 0x1
VHOST_USER_REPLY_MASK = 1 << 2
VHOST_USER_NEED_REPLY_MASK = 1 << 3
REPLY_FLAGS = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK  # QEMU accepts exactly 0x5
# Largest payload QEMU sends (a SET_MEM_TABLE of 8 regions, or a 256-byte config).
MAX_PAYLOAD = 4096
MAX_FDS = 8
VHOST_USER_VRING_NOFD_MASK = 1 << 8
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256


class Request(enum.IntEnum):
    """Front-end → back-end message IDs."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers (only bits below 20 are stable across peers)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"UNKNOWN({request})"


@dataclasses.dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int]

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def name(self) -> str:
        return request_name(self.request)


class ProtocolError(ValueError):
    """A message that does not follow vhost-user.rst; the text says what was wrong."""


def u64(payload: bytes) -> int:
    expect_size(payload, 8)
    return struct.unpack("<Q", payload)[0]


def pack_u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def vring_state(payload: bytes) -> tuple[int, int]:
    """(index, num) of a vhost_vring_state."""
    expect_size(payload, 8)
    return struct.unpack("<II", payload)


def pack_vring_state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


@dataclasses.dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


def vring_addr(payload: bytes) -> VringAddr:
    expect_size(payload, 40)
    return VringAddr(*struct.unpack("<IIQQQQ", payload))


@dataclasses.dataclass(frozen=True)
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


_REGION = struct.Struct("<QQQQ")


def memory_table(payload: bytes) -> list[MemoryRegion]:
    if len(payload) < 8:
        raise ProtocolError(f"memory table of {len(payload)} bytes has no header")
    nregions, _padding = struct.unpack_from("<II", payload)
    if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
        raise ProtocolError(f"memory table has {nregions} regions, the limit is "
                            f"{VHOST_MEMORY_BASELINE_NREGIONS}")
    if len(payload) < 8 + nregions * _REGION.size:
        raise ProtocolError(f"memory table of {nregions} regions needs "
                            f"{8 + nregions * _REGION.size} bytes, got {len(payload)}")
    return [MemoryRegion(*_REGION.unpack_from(payload, 8 + i * _REGION.size))
            for i in range(nregions)]


def single_region(payload: bytes) -> MemoryRegion:
    expect_size(payload, 8 + _REGION.size)
    return MemoryRegion(*_REGION.unpack_from(payload, 8))


_CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags


def config_access(payload: bytes) -> tuple[int, int, int, bytes]:
    """(offset, size, flags, data) of a vhost_user_config."""
    if len(payload) < _CONFIG_HEADER.size:
        raise ProtocolError(f"config message of {len(payload)} bytes has no header")
    offset, size, flags = _CONFIG_HEADER.unpack_from(payload)
    data = payload[_CONFIG_HEADER.size:]
    if size > VHOST_USER_MAX_CONFIG_SIZE or len(data) != size:
        raise ProtocolError(f"config message says {size} bytes and carries {len(data)}")
    return offset, size, flags, data


def pack_config(offset: int, flags: int, data: bytes) -> bytes:
    return _CONFIG_HEADER.pack(offset, len(data), flags) + data


def expect_size(payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise ProtocolError(f"payload is {len(payload)} bytes, expected {size}")
