"""The eventq thread (ext/eventq.pxi, viommu.dataplane.eventq): records leave its queue into
the buffers the driver posted and the driver is notified without Python; the relay's
counters and trace states follow exactly; losses, the summary record, resets, PASID drains
and a broken ring behave as on the Python path, which a differential property test
checks for any sequence of injections, buffer postings, drains and resets."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from threaded_eventq import EventqGuest

from viommu.events.faults import FaultRecord
from viommu.events.smmuv3 import EventId
from viommu.uapi import FaultReason

EP, EP2 = 0x100, 0x200


@pytest.fixture
def make() -> Iterator[Callable[..., EventqGuest]]:
    made: list[EventqGuest] = []

    def make_guest(threaded: bool = True, **kwargs) -> EventqGuest:
        made.append(EventqGuest(threaded, **kwargs))
        return made[-1]

    yield make_guest
    for guest in made:
        guest.close()


def wait_for(guest: EventqGuest, what: Callable[[], bool], timeout: float = 5) -> None:
    """Until `what()` holds, without serving any wake-up: what the thread does alone."""
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "the event thread did not get there"
        time.sleep(0.001)


def endpoints(received: list[tuple[int, bytes]]) -> list[int]:
    return [FaultRecord.decode(data[:24]).endpoint for _, data in received]


def test_a_record_goes_into_a_posted_buffer_and_the_driver_is_notified(make) -> None:
    g = make()
    g.post_buffers(4)
    g.inject(sid=EP)
    [(length, data)] = g.take_received()
    assert length == 24 and FaultRecord.decode(data).endpoint == EP
    assert g.notified()
    counters = g.counters()
    assert (counters["delivered"], counters["pending"]) == (1, 0)
    with g.lock:
        assert [e.state for e in g.relay.trace] == ["delivered"]
        assert g.eventq.counters()["delivered_by_thread"] == 1


def test_records_waiting_go_out_when_the_driver_posts_buffers_without_a_kick(make) -> None:
    g = make()
    g.inject(3, sid=EP)
    assert g.counters()["pending"] == 3
    g.post_buffers(2, kick=False)  # as Linux's first buffers: no kick
    wait_for(g, lambda: g.driver.used_idx() == 2)
    g.post_buffers(1, kick=True)
    wait_for(g, lambda: g.driver.used_idx() == 3)
    assert endpoints(g.take_received()) == [EP] * 3
    assert g.counters()["pending"] == 0 and g.counters()["delivered"] == 3


def test_trace_states_follow_the_threads_deliveries_when_queried(make) -> None:
    g = make()
    g.inject(2, sid=EP)
    g.post_buffers(2)
    wait_for(g, lambda: g.driver.used_idx() == 2)
    with g.lock:  # no wake-up was served: the query brings the states up to date
        assert g.relay.counters()["delivered"] == 2
        assert [e.state for e in g.relay.trace] == ["delivered", "delivered"]
        assert all(e.delivered_ns for e in g.relay.trace)


def test_overflow_summary_reaches_the_guest_without_python(make) -> None:
    g = make(capacity=2)
    g.inject(5, sid=EP)
    g.post_buffers(8)
    wait_for(g, lambda: g.driver.used_idx() == 3)  # two events, then the summary
    received = [FaultRecord.decode(d) for _, d in g.take_received()]
    assert received[2] == FaultRecord(FaultReason.UNKNOWN, 0, EP)
    counters = g.counters()
    assert (counters["delivered"], counters["lost"], counters["summaries"]) == (2, 3, 1)
    with g.lock:
        [summary] = [e for e in g.relay.trace if e.is_summary]
        assert summary.lost_count == 3 and summary.state == "delivered"


def test_reset_drops_what_the_thread_holds_and_counts_it_lost(make) -> None:
    g = make(capacity=2)
    g.inject(4, sid=EP)
    with g.lock:
        assert g.relay.drop_pending("reset") == 2
        assert g.eventq.server.held == 0
    g.post_buffers(4)
    time.sleep(0.05)
    assert g.take_received() == []  # neither the events nor the summary of the lost two
    counters = g.counters()
    assert (counters["lost"], counters["pending"], counters["summaries_pending"]) == (4, 0, 0)


def test_drained_pasid_records_leave_the_threads_queue(make) -> None:
    g = make()
    g.inject(sid=EP, ssid=5, address=0x1000)
    g.inject(sid=EP, ssid=6, address=0x2000)
    g.inject(sid=EP, ssid=5, address=0x3000)
    with g.lock:
        assert g.relay.drain(EP, 5, "PASID 5 unbound") == 2
    g.post_buffers(4)
    wait_for(g, lambda: g.driver.used_idx() == 1)
    [(_, data)] = g.take_received()
    assert FaultRecord.decode(data).address == 0x2000
    assert g.counters()["drained"] == 2


def test_a_broken_ring_marks_the_device_broken(make) -> None:
    g = make()
    g.inject(sid=EP)
    g.driver.set_avail_idx(1000)  # more than the ring size ahead
    g.post_buffers(0, kick=True)
    deadline = time.monotonic() + 5
    while not g.broken:
        assert time.monotonic() < deadline
        g.serve_wakeups(0.01)
    assert "avail index 1000" in g.broken
    assert g.counters()["pending"] == 1  # still accounted for


def test_records_stay_while_the_ring_is_stopped_and_go_out_on_restart(make) -> None:
    g = make()
    with g.lock:
        g.eventq.stopped()
    g.inject(2, sid=EP2)
    g.post_buffers(2, kick=False)
    with g.lock:
        assert g.eventq.server.held == 2
        g.eventq.started(g)
    assert endpoints(g.take_received()) == [EP2, EP2]


def test_a_new_call_fd_is_the_one_signalled(make) -> None:
    import os
    g = make()
    old = g.call_fd
    g.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
    with g.lock:
        g.eventq.call_changed()
    os.close(old)
    g.post_buffers(1)
    g.inject(sid=EP)
    assert g.notified()


def test_delivery_latency_is_measured_from_the_commands_arrival(make) -> None:
    g = make()
    g.post_buffers(4)
    arrived = time.monotonic_ns()
    with g.lock:
        entry = g.relay.submit(g_record(), arrived_ns=arrived)
        assert entry.state == "delivered"
        latency = g.relay.delivery_latency()
    assert latency["samples"] == 1 and latency["median_us"] >= 0


def g_record():
    from viommu.events.smmuv3 import EventRecord
    return EventRecord(event_id=EventId.C_BAD_STE, sid=EP)


# --- the thread and the Python path deliver alike ---------------------------------------------

OPS = st.one_of(
    st.tuples(st.just("inject"), st.integers(1, 6), st.sampled_from([EP, EP2]),
              st.sampled_from([None, 1, 2]),
              st.sampled_from([EventId.F_TRANSLATION, EventId.C_BAD_STE,
                               EventId.C_BAD_STREAMID]), st.just(0x1000)),
    st.tuples(st.just("post"), st.integers(0, 6), st.sampled_from([24, 24, 32, 16]),
              st.booleans()),
    st.tuples(st.just("chain"), st.just(((24, False),)), st.just(False), st.booleans()),
    st.tuples(st.just("drain"), st.sampled_from([EP, EP2]), st.sampled_from([None, 1, 2])),
    st.tuples(st.just("reset")),
    st.tuples(st.just("extended"), st.booleans()),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=30), st.integers(1, 6))
def test_thread_and_python_deliver_the_same_records_in_the_same_order(ops, capacity) -> None:
    python, threaded = EventqGuest(False, capacity=capacity), EventqGuest(True, capacity=capacity)
    try:
        for op in ops:
            for g in (python, threaded):
                g.replay(op)
            assert threaded.take_received() == python.take_received(), op
            assert threaded.notified() == python.notified(), op
            assert threaded.counters() == python.counters(), op
        with python.lock, threaded.lock:
            assert ([(e.seq, e.state, e.lost_count) for e in threaded.relay.trace]
                    == [(e.seq, e.state, e.lost_count) for e in python.relay.trace])
    finally:
        threaded.close()
        python.close()
