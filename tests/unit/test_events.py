"""SMMUv3 event records, their conversion to virtio-iommu fault records and the
relay's accounting: nothing vanishes."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viommu.dataplane.records import RecordQueue
from viommu.events.faults import FaultRecord, NotForwarded, fault_from_event
from viommu.events.relay import EventRelay
from viommu.events.smmuv3 import FETCH_EVENTS, EventClass, EventId, EventRecord, PageHint
from viommu.uapi import FaultFlag, FaultReason


def test_event_record_field_positions_match_the_architecture() -> None:
    record = EventRecord(event_id=EventId.F_TRANSLATION, sid=0x100, ssid=5, ssv=True,
                         stag=0x1234, stall=True, pnu=True, ind=True, rnw=False, s2=True,
                         event_class=EventClass.TT, address=0xDEAD_B000, ipa=0x8765_4000)
    dw0, dw1, dw2, dw3 = struct.unpack("<4Q", record.encode())
    assert dw0 == 0x10 | 1 << 11 | 5 << 12 | 0x100 << 32
    assert dw1 == 0x1234 | 1 << 31 | 1 << 33 | 1 << 34 | 0 << 35 | 1 << 39 | 1 << 40
    assert dw2 == 0xDEAD_B000
    assert dw3 == 0x8765_4000


def test_c_bad_ste_record_is_the_id_and_sid_only() -> None:
    raw = EventRecord(event_id=EventId.C_BAD_STE, sid=256).encode()
    assert raw == struct.pack("<4Q", 0x04 | 256 << 32, 0, 0, 0)


@given(st.one_of(st.builds(
    EventRecord, event_id=st.sampled_from([e for e in EventId if e != EventId.E_PAGE_REQUEST]),
    sid=st.integers(0, 2**32 - 1), ssid=st.integers(0, 2**20 - 1), ssv=st.booleans(),
    stag=st.integers(0, 0xFFFF), stall=st.booleans(), pnu=st.booleans(), ind=st.booleans(),
    rnw=st.booleans(), s2=st.booleans(), event_class=st.sampled_from(list(EventClass)),
    ttrnw=st.booleans(), address=st.integers(0, 2**64 - 1), ipa=st.just(0),
    fetch_addr=st.just(0)), st.builds(
    EventRecord, event_id=st.just(EventId.E_PAGE_REQUEST), sid=st.integers(0, 2**32 - 1),
    ssid=st.integers(0, 2**20 - 1), ssv=st.booleans(),
    address=st.integers(0, 2**52 - 1).map(lambda page: page << 12),
    span=st.integers(0, 0xFF), page_hints=st.integers(0, 0x3F))))
def test_event_record_decode_inverts_encode(record: EventRecord) -> None:
    assert EventRecord.decode(record.encode()) == record


def test_page_request_hint_record_has_the_architectures_own_layout() -> None:
    """E_PAGE_REQUEST (IHI 0070 7.3): Span in DW1[51:44], pR/pW/pX in DW1[39:37], uR/uW/uX
    in DW1[35:33], InputAddr[63:12] in DW2; nothing of the fault records' DW1 or DW3."""
    record = EventRecord(event_id=EventId.E_PAGE_REQUEST, sid=0x100, ssid=3, ssv=True,
                         address=0xDEAD_B000, span=2, page_hints=PageHint.PW | PageHint.UX)
    dw0, dw1, dw2, dw3 = struct.unpack("<4Q", record.encode())
    assert dw0 == 0x24 | 1 << 11 | 3 << 12 | 0x100 << 32
    assert dw1 == 2 << 44 | 1 << 38 | 1 << 33
    assert (dw2, dw3) == (0xDEAD_B000, 0)


def test_a_page_request_hint_reaches_the_guest_with_its_address_and_access() -> None:
    record = EventRecord(event_id=EventId.E_PAGE_REQUEST, sid=EP, address=0xDEAD_B000,
                         span=1, page_hints=PageHint.UW)
    fault = fault_from_event(record)
    assert fault.guest_line() == f"page fault from EP {EP} at 0xdeadb000 [W]"
    assert FaultRecord.decode(fault.encode()) == FaultRecord(
        FaultReason.MAPPING, FaultFlag.ADDRESS | FaultFlag.WRITE, EP, 0xDEAD_B000)


@pytest.mark.parametrize("fields", [{"address": 0xDEAD_B123}, {"rnw": True}, {"stall": True}],
                         ids=["unaligned-address", "rnw", "stall"])
def test_a_page_request_hint_refuses_what_its_record_cannot_hold(fields: dict) -> None:
    with pytest.raises(ValueError, match="E_PAGE_REQUEST"):
        EventRecord(event_id=EventId.E_PAGE_REQUEST, sid=1, **fields)


def test_fetch_address_decodes_for_fetch_events_and_ipa_for_others() -> None:
    cd = EventRecord(event_id=EventId.F_CD_FETCH, sid=1, fetch_addr=0x1238)
    assert EventRecord.decode(cd.encode()).fetch_addr == 0x1238
    assert EventId.F_CD_FETCH in FETCH_EVENTS
    tr = EventRecord(event_id=EventId.F_TRANSLATION, sid=1, s2=True, ipa=0x5000)
    assert EventRecord.decode(tr.encode()).ipa == 0x5000


@pytest.mark.parametrize("field,value", [("sid", 2**32), ("ssid", 2**20), ("event_id", 256),
                                         ("address", -1), ("stag", True)])
def test_event_record_rejects_fields_that_do_not_fit(field: str, value: int) -> None:
    args = {"event_id": EventId.C_BAD_STE, "sid": 1, field: value}
    with pytest.raises(ValueError, match=field):
        EventRecord(**args)


@pytest.mark.parametrize("name,number", [("C_BAD_STE", 4), ("c_bad_cd", 10), ("0x10", 16),
                                         (19, 19)])
def test_event_id_parse_accepts_names_and_numbers(name, number) -> None:
    assert EventId.parse(name) == number


def test_event_id_parse_error_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match="C_BAD_STE"):
        EventId.parse("NOPE")


# --- conversion (SMMUv3 event to virtio-iommu fault record) and the guest's line ------------

EP = 256


@pytest.mark.parametrize("event_id,kwargs,line", [
    (EventId.C_BAD_STE, {}, "unknown fault from EP 256"),
    (EventId.C_BAD_CD, {"ssid": 3, "ssv": True}, "unknown fault from EP 256"),
    (EventId.C_BAD_SUBSTREAMID, {"ssid": 9}, "unknown fault from EP 256"),
    (EventId.F_CD_FETCH, {"fetch_addr": 0x1000}, "unknown fault from EP 256"),
    (EventId.F_STREAM_DISABLED, {}, "domain fault from EP 256"),
    (EventId.F_TRANSLATION, {"address": 0x10000, "rnw": True},
     "page fault from EP 256 at 0x10000 [R]"),
    (EventId.F_TRANSLATION, {"address": 0x10000, "rnw": False},
     "page fault from EP 256 at 0x10000 [W]"),
    (EventId.F_PERMISSION, {"address": 0x3000, "rnw": True, "ind": True},
     "page fault from EP 256 at 0x3000 [RX]"),
    (EventId.F_ACCESS, {"address": 0, "rnw": True}, "page fault from EP 256 at 0x0 [R]"),
    (EventId.F_ADDR_SIZE, {"address": 1 << 50}, f"page fault from EP 256 at {1 << 50:#x} [W]"),
    (EventId.F_WALK_EABT, {"address": 0x2000, "rnw": True},
     "unknown fault from EP 256 at 0x2000 [R]"),
    (EventId.F_UUT, {"address": 0x4000, "rnw": False},
     "unknown fault from EP 256 at 0x4000 [W]"),
])
def test_event_becomes_the_fault_record_of_the_mapping_table(event_id, kwargs, line) -> None:
    fault = fault_from_event(EventRecord(event_id=event_id, sid=EP, **kwargs))
    assert fault.endpoint == EP
    assert fault.guest_line() == line


@pytest.mark.parametrize("event_id", [EventId.C_BAD_STREAMID, EventId.F_STE_FETCH,
                                      EventId.F_VMS_FETCH, EventId.F_TLB_CONFLICT,
                                      EventId.F_CFG_CONFLICT])
def test_host_side_events_are_not_forwarded(event_id: EventId) -> None:
    with pytest.raises(NotForwarded):
        fault_from_event(EventRecord(event_id=event_id, sid=EP))


def test_fault_record_is_24_bytes_with_zero_reserved_fields() -> None:
    raw = FaultRecord(FaultReason.MAPPING, int(FaultFlag.ADDRESS | FaultFlag.WRITE), EP,
                      0x1000).encode()
    assert len(raw) == 24
    reason, reserved, flags, endpoint, reserved1, address = struct.unpack("<B3sIIIQ", raw)
    assert (reason, flags, endpoint, address) == (2, 0x102, EP, 0x1000)
    assert reserved == b"\0\0\0" and reserved1 == 0
    assert FaultRecord.decode(raw) == FaultRecord(2, 0x102, EP, 0x1000)


# --- relay ----------------------------------------------------------------------------------


class Guest:
    """An eventq with `buffers` posted buffers."""

    def __init__(self, buffers: int) -> None:
        self.buffers = buffers
        self.received: list[bytes] = []

    def __call__(self, record: bytes) -> bool:
        if not self.buffers:
            return False
        self.buffers -= 1
        self.received.append(record)
        return True

    def post(self, relay: EventRelay, buffers: int) -> int:
        """Post `buffers` more buffers and let the relay deliver; the number delivered."""
        self.buffers += buffers
        return relay.deliver()


def relay_to(guest: Guest, capacity: int = 1024) -> EventRelay:
    relay = EventRelay(capacity=capacity)
    relay.attach_sink(RecordQueue(guest))
    return relay


def bad_ste(sid: int = EP) -> EventRecord:
    return EventRecord(event_id=EventId.C_BAD_STE, sid=sid)


def accounted(relay: EventRelay) -> bool:
    c = relay.counters()
    return c["injected"] == (c["delivered"] + c["pending"] + c["lost"] + c["not_forwarded"]
                             + c["drained"])


def test_event_waits_while_the_guest_has_no_buffer_then_is_delivered() -> None:
    guest = Guest(0)
    relay = relay_to(guest)
    relay.submit(bad_ste())
    assert relay.pending == 1
    assert guest.post(relay, 1) == 1
    assert relay.pending == 0 and relay.delivered == 1
    assert FaultRecord.decode(guest.received[0]).endpoint == EP
    [entry] = relay.trace
    assert entry.state == "delivered"


def test_records_wait_in_the_relay_until_an_eventq_is_attached() -> None:
    relay = EventRelay()
    relay.submit(bad_ste(1))
    relay.submit(bad_ste(2))
    guest = Guest(10)
    relay.attach_sink(RecordQueue(guest))
    relay.deliver()
    assert [FaultRecord.decode(r).endpoint for r in guest.received] == [1, 2]
    assert relay.pending == 0 and relay.delivered == 2


def test_events_are_delivered_in_order() -> None:
    guest = Guest(0)
    relay = relay_to(guest)
    for sid in (1, 2, 3):
        relay.submit(bad_ste(sid))
    guest.post(relay, 10)
    assert [FaultRecord.decode(r).endpoint for r in guest.received] == [1, 2, 3]


def test_fifo_overflow_counts_the_loss() -> None:
    relay = EventRelay(capacity=4)
    entries = [relay.submit(bad_ste()) for _ in range(10)]
    assert [e.state for e in entries].count("lost") == 6
    assert relay.pending == 4 and relay.lost == 6
    assert accounted(relay)


def test_reset_counts_pending_events_as_lost() -> None:
    relay = EventRelay()
    relay.submit(bad_ste())
    relay.submit(bad_ste())
    assert relay.drop_pending("reset") == 2
    assert relay.lost == 2 and relay.pending == 0
    assert [e.state for e in relay.trace] == ["lost", "lost"]
    assert accounted(relay)


@given(st.lists(st.tuples(st.sampled_from(["submit", "host", "post"]), st.integers(0, 5)),
                max_size=60))
def test_every_event_is_accounted_for(ops) -> None:
    guest = Guest(0)
    relay = relay_to(guest, capacity=8)
    for op, n in ops:
        if op == "submit":
            relay.submit(bad_ste())
        elif op == "host":
            relay.submit(EventRecord(event_id=EventId.C_BAD_STREAMID, sid=EP))
        else:
            guest.post(relay, n)
        assert accounted(relay)


def test_overflow_reaches_the_guest_as_one_summary_record_once_there_is_room() -> None:
    guest = Guest(0)
    relay = relay_to(guest, capacity=2)
    for sid in (1, 2, 3, 4, 5):
        relay.submit(bad_ste(sid))
    guest.post(relay, 10)
    received = [FaultRecord.decode(r) for r in guest.received]
    assert [r.endpoint for r in received] == [1, 2, 3]  # the kept two, then the summary
    assert received[2] == FaultRecord(FaultReason.UNKNOWN, 0, 3)  # the first lost stream
    assert relay.counters()["summaries"] == 1 and relay.lost == 3
    assert accounted(relay)
    [summary] = [e for e in relay.trace if e.is_summary]
    assert summary.to_dict()["lost_count"] == 3


def test_a_huge_burst_costs_what_the_fifo_can_take_and_counts_the_rest_lost() -> None:
    guest = Guest(0)
    relay = relay_to(guest, capacity=8)
    entries = relay.submit_burst(bad_ste(), 1_000_000)
    assert relay.pending == 8 and relay.lost == 1_000_000 - 8
    assert len(entries) == 9  # eight queued, one trace entry for the lost copies
    assert accounted(relay)
    guest.post(relay, 100)
    assert FaultRecord.decode(guest.received[-1]).reason == FaultReason.UNKNOWN  # summary


def test_summary_record_waiting_for_a_buffer_is_counted_pending() -> None:
    guest = Guest(0)
    relay = relay_to(guest, capacity=2)
    for sid in (1, 2, 3):
        relay.submit(bad_ste(sid))
    guest.post(relay, 2)  # the two kept events; the summary goes in behind them
    counters = relay.counters()
    assert (counters["pending"], counters["summaries_pending"], counters["summaries"]) == (
        0, 1, 0)
    guest.post(relay, 1)
    counters = relay.counters()
    assert (counters["summaries_pending"], counters["summaries"]) == (0, 1)


def test_records_are_encoded_again_when_the_driver_negotiates_extended_records() -> None:
    guest = Guest(0)
    relay = relay_to(guest)
    relay.submit(bad_ste())
    relay.extended = True  # the driver came up with VIOMMU_F_PAGE_REQUEST after the event
    guest.post(relay, 1)
    assert len(guest.received[0]) == 32


def test_delivery_latency_runs_from_the_commands_arrival() -> None:
    guest = Guest(1)
    relay = relay_to(guest)
    arrived = time.monotonic_ns()
    [entry] = [relay.submit(bad_ste(), arrived_ns=arrived)]
    assert entry.state == "delivered" and entry.delivered_ns >= arrived
    latency = relay.delivery_latency()
    assert latency["samples"] == 1 and 0 <= latency["median_us"] == latency["p99_us"]
    assert entry.to_dict()["delivery_us"] >= 0
