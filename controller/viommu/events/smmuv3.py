"""SMMUv3 event records (Arm IHI 0070, "Event queue record"; Linux arm-smmu-v3.h EVTQ_*).

The backend's internal event type is the architected 32-byte record, so injected events,
events from real translations and events read from an iommufd vEVENTQ are the same thing.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

EVENT_RECORD_SIZE = 32


class EventId(enum.IntEnum):
    """Event type IDs, named as the architecture names them."""

    F_UUT = 0x01
    C_BAD_STREAMID = 0x02
    F_STE_FETCH = 0x03
    C_BAD_STE = 0x04
    F_BAD_ATS_TREQ = 0x05
    F_STREAM_DISABLED = 0x06
    F_TRANSL_FORBIDDEN = 0x07
    C_BAD_SUBSTREAMID = 0x08
    F_CD_FETCH = 0x09
    C_BAD_CD = 0x0A
    F_WALK_EABT = 0x0B
    F_TRANSLATION = 0x10
    F_ADDR_SIZE = 0x11
    F_ACCESS = 0x12
    F_PERMISSION = 0x13
    F_TLB_CONFLICT = 0x20
    F_CFG_CONFLICT = 0x21
    E_PAGE_REQUEST = 0x24
    F_VMS_FETCH = 0x25

    @classmethod
    def parse(cls, value: str | int) -> EventId:
        """Accept a name ("C_BAD_STE"), a number (4) or a numeric string ("0x04")."""
        if isinstance(value, bool):
            raise ValueError(f"event type must be a name or number, not {value!r}")
        try:
            if isinstance(value, int):
                return cls(value)
            name = value.strip().upper()
            return cls[name] if name in cls.__members__ else cls(int(name, 0))
        except ValueError:
            known = ", ".join(cls.__members__)
            raise ValueError(f"unknown SMMUv3 event type {value!r}; known: {known}") from None


class EventClass(enum.IntEnum):
    """CLASS field: what the faulting access was for."""

    CD = 0  # CD fetch
    TT = 1  # stage-1 translation table fetch
    IN = 2  # the input address itself


# Events whose record carries InputAddr (and RnW/InD/PnU), per the architecture.
ADDRESS_EVENTS = frozenset({
    EventId.F_UUT, EventId.F_TRANSL_FORBIDDEN, EventId.F_WALK_EABT, EventId.F_TRANSLATION,
    EventId.F_ADDR_SIZE, EventId.F_ACCESS, EventId.F_PERMISSION, EventId.F_BAD_ATS_TREQ,
})
# Events carrying FetchAddr in DW3: fetches of configuration, and a table walk's abort.
FETCH_EVENTS = frozenset({EventId.F_STE_FETCH, EventId.F_CD_FETCH, EventId.F_VMS_FETCH,
                          EventId.F_WALK_EABT})
# Configuration errors: they stay raised for the stream until it is reprogrammed.
CONFIG_EVENTS = frozenset({EventId.C_BAD_STE, EventId.C_BAD_CD, EventId.C_BAD_SUBSTREAMID})


def is_config_event(event_id: int) -> bool:
    return event_id in CONFIG_EVENTS


@dataclasses.dataclass(frozen=True)
class EventRecord:
    """One decoded event queue record. `address` is InputAddr; `ipa` and `fetch_addr`
    share DW3 in the architecture, so at most one of them is non-zero."""

    event_id: int
    sid: int
    ssid: int = 0
    ssv: bool = False
    stag: int = 0
    stall: bool = False
    pnu: bool = False  # privileged
    ind: bool = False  # instruction fetch
    rnw: bool = False  # read (True) or write (False)
    s2: bool = False
    event_class: int = EventClass.CD
    ttrnw: bool = False
    address: int = 0
    ipa: int = 0
    fetch_addr: int = 0

    def __post_init__(self) -> None:
        _check_bits("event_id", self.event_id, 8)
        _check_bits("sid", self.sid, 32)
        _check_bits("ssid", self.ssid, 20)
        _check_bits("stag", self.stag, 16)
        _check_bits("class", self.event_class, 2)
        _check_bits("address", self.address, 64)
        _check_bits("ipa", self.ipa, 52)
        _check_bits("fetch_addr", self.fetch_addr, 52)
        if self.ipa and self.fetch_addr:
            raise ValueError("ipa and fetch_addr share DW3: give at most one")

    @property
    def name(self) -> str:
        try:
            return EventId(self.event_id).name
        except ValueError:
            return f"EVENT_{self.event_id:#04x}"

    def encode(self) -> bytes:
        dw0 = self.event_id | (self.ssv << 11) | (self.ssid << 12) | (self.sid << 32)
        dw1 = (self.stag | (self.stall << 31) | (self.pnu << 33) | (self.ind << 34)
               | (self.rnw << 35) | (self.s2 << 39) | (self.event_class << 40)
               | (self.ttrnw << 44))
        dw3 = (self.ipa & ~0xFFF) | (self.fetch_addr & ~0x7)
        return struct.pack("<4Q", dw0, dw1, self.address, dw3)

    @classmethod
    def decode(cls, raw: bytes) -> EventRecord:
        if len(raw) != EVENT_RECORD_SIZE:
            raise ValueError(f"an SMMUv3 event record is {EVENT_RECORD_SIZE} bytes, got {len(raw)}")
        dw0, dw1, dw2, dw3 = struct.unpack("<4Q", raw)
        event_id = dw0 & 0xFF
        dw3_addr = dw3 & ((1 << 52) - 1)
        is_fetch = event_id in {e.value for e in FETCH_EVENTS}
        return cls(
            event_id=event_id, ssv=bool(dw0 >> 11 & 1), ssid=dw0 >> 12 & 0xFFFFF,
            sid=dw0 >> 32, stag=dw1 & 0xFFFF, stall=bool(dw1 >> 31 & 1),
            pnu=bool(dw1 >> 33 & 1), ind=bool(dw1 >> 34 & 1), rnw=bool(dw1 >> 35 & 1),
            s2=bool(dw1 >> 39 & 1), event_class=dw1 >> 40 & 3, ttrnw=bool(dw1 >> 44 & 1),
            address=dw2,
            ipa=0 if is_fetch else dw3_addr & ~0xFFF,
            fetch_addr=dw3_addr & ~0x7 if is_fetch else 0,
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["type"] = self.name
        return out


def _check_bits(name: str, value: int, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value:#x} does not fit in {bits} bits")
