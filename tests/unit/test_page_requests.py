"""Page request groups: relayed to the guest, answered exactly once by policy, stop markers
and timeouts, bounded, and drained when a PASID is unbound (stale faults, a stop marker, then
the next address space's: linux-kernel, "[RFC PATCHES 00/17] IOMMUFD: Deliver IO page faults
to user space", June 2023)."""

from __future__ import annotations

import pytest

from viommu.dataplane.records import RecordQueue
from viommu.events.faults import FaultRecord
from viommu.events.page_requests import PageRequest, PageRequestRelay, ResponseCode
from viommu.events.relay import EventRelay

EP = 0x200


class Guest:
    """The eventq: `buffers` posted buffers; keeps what it received."""

    def __init__(self, buffers: int = 0) -> None:
        self.buffers = buffers
        self.records: list[bytes] = []

    def __call__(self, record: bytes) -> bool:
        if not self.buffers:
            return False
        self.buffers -= 1
        self.records.append(record)
        return True


class Timer:
    def __init__(self, timers: list, entry: tuple) -> None:
        self.timers, self.entry = timers, entry

    def cancel(self) -> None:
        self.timers.remove(self.entry)


class Harness:
    def __init__(self, policy: str = "invalid", buffers: int = 64, **kwargs) -> None:
        self.events = EventRelay()
        self.guest = Guest(buffers)
        self.emitted: list[tuple[str, dict]] = []
        self.timers: list[tuple[float, object]] = []
        self.events.attach_sink(RecordQueue(self.guest))
        self.relay = PageRequestRelay(self.events, self, self, policy=policy, **kwargs)
        self.answers: list[tuple[int, ResponseCode]] = []

    # The harness is the page-request relay's announcer and timers.

    def emit(self, name: str, data: dict) -> None:
        self.emitted.append((name, data))

    def call_later(self, delay: float, fn) -> Timer:
        timer = Timer(self.timers, (delay, fn))
        self.timers.append(timer.entry)
        return timer

    def group(self, grpid: int, pages: list[int], pasid: int | None = None,
              write: bool = True) -> None:
        for i, page in enumerate(pages):
            request = PageRequest(EP, grpid, page, last=i == len(pages) - 1, read=not write,
                                  write=write, pasid=pasid)
            self.relay.submit(request, lambda code, g=grpid: self.answers.append((g, code)))

    def faults(self) -> list[FaultRecord]:
        self.events.deliver()
        return [FaultRecord.decode(r[:24]) for r in self.guest.records]


def test_invalid_policy_relays_every_request_then_answers_the_group_once() -> None:
    h = Harness("invalid")
    h.group(3, [0x10000, 0x11000, 0x12000])
    assert [f.address for f in h.faults()] == [0x10000, 0x11000, 0x12000]
    assert [f.guest_line() for f in h.faults()][0] == f"page fault from EP {EP} at 0x10000 [W]"
    assert h.answers == [(3, ResponseCode.INVALID_REQUEST)]


def test_host_policy_waits_for_the_controller_and_takes_one_answer() -> None:
    h = Harness("host")
    h.group(4, [0x10000, 0x11000])
    [(name, data)] = h.emitted
    assert name == "PAGE_REQUEST" and len(data["requests"]) == 2 and h.answers == []
    h.relay.respond(data["id"], ResponseCode.SUCCESS, "controller")
    assert h.answers == [(4, ResponseCode.SUCCESS)]
    with pytest.raises(KeyError):
        h.relay.respond(data["id"], ResponseCode.SUCCESS, "controller")
    assert h.faults() == []  # resolved host-side: nothing for the guest to log


def test_an_unanswered_group_is_answered_invalid_when_its_timeout_fires() -> None:
    h = Harness("host", timeout=2.0)
    h.group(5, [0x10000])
    [(delay, fire)] = h.timers
    assert delay == 2.0
    fire()
    assert h.answers == [(5, ResponseCode.INVALID_REQUEST)]
    assert h.relay.counters()["timeouts"] == 1


def test_a_stop_marker_gets_no_response_and_no_fault() -> None:
    h = Harness("invalid")
    h.relay.submit(PageRequest(EP, 6, 0, last=True, read=False, write=False, pasid=3),
                   lambda code: h.answers.append((6, code)))
    assert h.answers == [] and h.faults() == []
    assert h.relay.counters()["stop_markers"] == 1


def test_pending_groups_are_bounded_and_the_overflow_is_answered_at_once() -> None:
    h = Harness("host", max_groups=1)
    h.group(1, [0x10000])
    h.group(2, [0x20000])
    assert h.answers == [(2, ResponseCode.INVALID_REQUEST)]
    assert h.relay.counters()["overflows"] == 1


def test_guest_policy_without_the_feature_falls_back_to_invalid() -> None:
    h = Harness("guest")
    h.group(7, [0x10000])
    assert h.answers == [(7, ResponseCode.INVALID_REQUEST)] and len(h.faults()) == 1


def test_guest_policy_relays_extended_records_and_waits_for_page_resp() -> None:
    h = Harness("guest")
    h.relay.guest_can_answer = True
    h.events.extended = True
    h.group(8, [0x10000], pasid=9)
    h.events.deliver()
    [record] = h.guest.records
    assert len(record) == 32 and int.from_bytes(record[12:16], "little") == 9
    assert int.from_bytes(record[24:26], "little") == 8
    assert h.answers == []
    h.relay.respond(h.relay.find(EP, 9, 8), ResponseCode.SUCCESS, "guest")
    assert h.answers == [(8, ResponseCode.SUCCESS)]


def test_unbinding_a_pasid_drains_stale_requests_before_the_next_address_space() -> None:
    """Seed 004: stale faults for PASID 5, a stop marker, then faults of the next address
    space bound to PASID 5. Nothing stale may reach the new address space."""
    h = Harness("guest", buffers=0)  # the guest has no eventq buffer yet: records wait
    h.relay.guest_can_answer = True
    h.group(1, [0xA000], pasid=5)  # old address space
    h.group(2, [0xB000], pasid=5)
    h.relay.submit(PageRequest(EP, 3, 0, last=True, read=False, write=False, pasid=5),
                   lambda code: h.answers.append((3, code)))  # stop marker
    h.group(9, [0xE000], pasid=6)  # another PASID: untouched
    h.relay.drain(EP, 5)  # unbind PASID 5
    h.group(1, [0xC000], pasid=5)  # next address space, reusing a group index
    h.guest.buffers = 64
    assert [(f.address, f.endpoint) for f in h.faults()] == [(0xE000, EP), (0xC000, EP)]
    assert h.answers == [(1, ResponseCode.INVALID_REQUEST), (2, ResponseCode.INVALID_REQUEST)]
    assert h.events.drained == 2 and h.relay.counters()["drained_groups"] == 2
    assert h.relay.find(EP, 5, 1) is not None  # only the new group waits for an answer
    assert h.relay.find(EP, 5, 2) is None
