"""SMMUv3 event records (Arm IHI 0070, "Event queue record"; Linux arm-smmu-v3.h EVTQ_*).

The backend's internal event type is the architected 32-byte record, so injected events,
events from real translations and events read from an iommufd vEVENTQ are the same thing.
Event IDs, CLASS values, the record's bit layout and which event types carry which fields
are defined once, in ext/uapi/smmuv3.pxd and ext/event_records.pxi: the enums here are built
from the extension's, and EventRecord encodes and decodes through the same C code the
translation engine writes its records with.
"""

from __future__ import annotations

import dataclasses
import enum

from viommu import _dataplane as hw
from viommu.uapi import python_enum

EVENT_RECORD_SIZE = hw.EVENT_RECORD_SIZE


class _EventIdBase(enum.IntEnum):
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


EventId = python_enum(hw.EventId, kind=_EventIdBase, module=__name__,
                      doc="Event type IDs, named as the architecture names them.")
EventClass = python_enum(hw.EventClass, "CLASS_", module=__name__,
                         doc="CLASS field: what the faulting access was for (CD fetch, "
                             "stage-1 table fetch, the input address itself).")
PageHint = python_enum(hw.PageHint, "PAGE_HINT_", enum.IntFlag, module=__name__,
                       doc="The accesses an E_PAGE_REQUEST anticipates: (P)rivileged or "
                           "(U)nprivileged (R)ead, (W)rite, e(X)ecute.")
PAGE_HINT_READ = PageHint.PR | PageHint.UR
PAGE_HINT_WRITE = PageHint.PW | PageHint.UW
PAGE_HINT_EXEC = PageHint.PX | PageHint.UX
PAGE_HINT_PRIVILEGED = PageHint.PR | PageHint.PW | PageHint.PX

# Events whose record carries InputAddr (and RnW/InD/PnU), per the architecture.
ADDRESS_EVENTS = frozenset(e for e in EventId if hw.event_has_input_addr(e))
# Events carrying FetchAddr in DW3: fetches of configuration, and a table walk's abort.
FETCH_EVENTS = frozenset(e for e in EventId if hw.event_has_fetch_addr(e))
# Configuration errors: latched on the stream until it is reprogrammed.
CONFIG_EVENTS = frozenset(e for e in EventId if hw.event_is_config_error(e))


def is_config_event(event_id: int) -> bool:
    return bool(hw.event_is_config_error(event_id))


def _field_bits(msb: int, lsb: int) -> int:
    return msb - lsb + 1


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
    # E_PAGE_REQUEST only: the span of the hinted access in 4 KiB pages, and the accesses
    # it anticipates (PageHint bits). Its record has none of the fields above but the
    # stream's and `address` (a page address: InputAddr[63:12]).
    span: int = 0
    page_hints: int = 0

    def __post_init__(self) -> None:
        _check_bits("event_id", self.event_id, _field_bits(hw.EVTQ_0_ID_MSB, hw.EVTQ_0_ID_LSB))
        _check_bits("sid", self.sid, _field_bits(hw.EVTQ_0_SID_MSB, hw.EVTQ_0_SID_LSB))
        _check_bits("ssid", self.ssid, _field_bits(hw.EVTQ_0_SSID_MSB, hw.EVTQ_0_SSID_LSB))
        _check_bits("stag", self.stag, _field_bits(hw.EVTQ_1_STAG_MSB, hw.EVTQ_1_STAG_LSB))
        _check_bits("class", self.event_class,
                    _field_bits(hw.EVTQ_1_CLASS_MSB, hw.EVTQ_1_CLASS_LSB))
        _check_bits("address", self.address, _field_bits(hw.EVTQ_2_ADDR_MSB, hw.EVTQ_2_ADDR_LSB))
        _check_bits("ipa", self.ipa, hw.EVTQ_3_IPA_MSB + 1)
        _check_bits("fetch_addr", self.fetch_addr, hw.EVTQ_3_FETCH_ADDR_MSB + 1)
        if self.ipa and self.fetch_addr:
            raise ValueError("ipa and fetch_addr share DW3: give at most one")
        _check_bits("span", self.span, _field_bits(hw.EVTQ_1_SPAN_MSB, hw.EVTQ_1_SPAN_LSB))
        _check_bits("page_hints", self.page_hints, len(PageHint))
        if self.event_id == EventId.E_PAGE_REQUEST:
            self._check_page_request()
        elif self.span or self.page_hints:
            raise ValueError("span and page_hints are fields of E_PAGE_REQUEST records only")

    def _check_page_request(self) -> None:
        if self.address & ((1 << hw.EVTQ_2_PAGE_ADDR_LSB) - 1):
            raise ValueError(f"an E_PAGE_REQUEST carries a page address (InputAddr[63:12]), "
                             f"not {self.address:#x}")
        others = [f.name for f in dataclasses.fields(self)
                  if f.name in _NOT_IN_PAGE_REQUESTS and getattr(self, f.name) != f.default]
        if others:
            raise ValueError(f"E_PAGE_REQUEST records carry no {', '.join(others)}")

    @property
    def name(self) -> str:
        try:
            return EventId(self.event_id).name
        except ValueError:
            return f"EVENT_{self.event_id:#04x}"

    def encode(self) -> bytes:
        return hw.encode_event_record(self)

    @classmethod
    def decode(cls, raw: bytes) -> EventRecord:
        return cls(**hw.decode_event_record(raw))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["type"] = self.name
        return out


# Fields of the other records that an E_PAGE_REQUEST's record has no room for.
_NOT_IN_PAGE_REQUESTS = frozenset({"stag", "stall", "pnu", "ind", "rnw", "s2", "event_class",
                                   "ttrnw", "ipa", "fetch_addr"})


def _check_bits(name: str, value: int, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value:#x} does not fit in {bits} bits")
