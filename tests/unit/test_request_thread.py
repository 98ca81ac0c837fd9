"""The requestq thread (ext/requestq.pxi, viommu.dataplane.requestq): MAP/UNMAP served
without the GIL, everything else handed to Python, the same statuses either way,
the trace in ring order,
kicks suppressed only while it polls, and nothing lost when it stops mid hand-off."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_requests import ALL_FEATURES, EP, EP2, Harness, attach, detach, map_, unmap
from threaded_ring import ThreadServedRing
from viommu._dataplane import DataplaneLock
from viommu.device.virtio_iommu import DeviceConfig, VirtioIommuDevice
from viommu.uapi import Feature, MapFlag, RequestType, Status
from virtio_driver import FakeDriver

PAGE = 0x1000
MSI = 0xFEE0_0000


class ThreadHarness(ThreadServedRing):
    """Requests to a device with endpoints EP and EP2, through the request thread."""

    def __init__(self, poll_us: float = 0, features: int = ALL_FEATURES, adaptive: bool = True,
                 null_device: bool = False, **config) -> None:
        device = VirtioIommuDevice([EP, EP2], DeviceConfig(**config))
        device.driver_features = features
        super().__init__(device, poll_us, adaptive=adaptive, null_device=null_device)

    def submit(self, readable: bytes, kick: bool | None = True) -> Status:
        """`kick` None: as a driver does, kick unless the device suppresses kicks, looking
        at the flag after publishing (virtio spec 2.7.10)."""
        head, wgpa = self.driver.post(readable, 4)
        if kick or (kick is None and not self.driver.vq.kicks_suppressed):
            self.kick_now()
        self.wait_used(self.driver._avail_idx)
        [(used_id, used_len)] = self.driver.take_used()
        assert (used_id, used_len) == (head, 4)
        return Status(self.driver.read(wgpa, 1)[0])

    def mappings(self, domain: int) -> list[tuple[int, int, int]]:
        with self.lock:
            if domain not in self.device.domains:
                return []
            return [(m.virt_start, m.virt_end, m.phys_start)
                    for m in self.device.domains[domain].mappings]

    def counters(self) -> dict:
        with self.lock:
            return self.service.counters()


@pytest.fixture
def make() -> Iterator[Callable[..., ThreadHarness]]:
    """ThreadHarness(**kwargs), closed after the test."""
    made: list[ThreadHarness] = []

    def make_harness(**kwargs) -> ThreadHarness:
        made.append(ThreadHarness(**kwargs))
        return made[-1]

    yield make_harness
    for harness in made:
        harness.close()


@pytest.fixture
def t(make: Callable[..., ThreadHarness]) -> ThreadHarness:
    return make()


def test_map_and_unmap_are_served_by_the_thread_and_attach_by_python(t: ThreadHarness) -> None:
    assert t.submit(attach(1, EP)) == Status.S_OK
    assert t.submit(map_(1, 0x10000, 0x10FFF, 0x80000)) == Status.S_OK
    assert t.mappings(1) == [(0x10000, 0x10FFF, 0x80000)]
    assert t.submit(unmap(1, 0x10000, 0x10FFF)) == Status.S_OK
    assert t.mappings(1) == []
    counters = t.counters()
    assert counters["served_by_thread"] == 2
    assert counters["handed_to_python"] == 1


def test_failing_map_is_answered_by_python_with_the_spec_status(t: ThreadHarness) -> None:
    assert t.submit(map_(9, 0, PAGE - 1, 0)) == Status.S_NOENT  # no such domain
    assert t.submit(attach(1, EP)) == Status.S_OK
    assert t.submit(map_(1, 0x800, 0x17FF, 0)) == Status.S_RANGE  # unaligned
    assert t.submit(map_(1, MSI, MSI + PAGE - 1, 0)) == Status.S_INVAL  # reserved window
    assert t.counters()["served_by_thread"] == 0


def test_trace_lists_thread_and_python_requests_in_ring_order(t: ThreadHarness) -> None:
    t.submit(attach(1, EP))
    t.submit(map_(1, 0, PAGE - 1, 0))
    t.submit(attach(2, EP2))
    t.submit(map_(2, 0, PAGE - 1, 0))
    t.submit(unmap(1, 0, PAGE - 1))
    with t.lock:
        t.service.drain()
        trace = list(t.device.requests.trace)
        counts = dict(t.device.requests.counts)
    assert [(e["type"], e.get("domain")) for e in trace] == [
        ("ATTACH", 1), ("MAP", 1), ("ATTACH", 2), ("MAP", 2), ("UNMAP", 1)]
    assert [e["seq"] for e in trace] == [1, 2, 3, 4, 5]
    assert trace[1]["phys_start"] == 0 and trace[1]["flags"] == MapFlag.READ | MapFlag.WRITE
    assert counts == {"ATTACH": 2, "MAP": 2, "UNMAP": 1}


def test_unmap_by_the_thread_drops_the_engines_cached_translation(t: ThreadHarness) -> None:
    t.submit(attach(1, EP))
    t.submit(map_(1, 0, PAGE - 1, 0x5000))
    with t.lock:
        generation = t.device.domains[1].mappings.generation
    t.submit(unmap(1, 0, PAGE - 1))
    with t.lock:
        assert t.device.domains[1].mappings.generation != generation


def test_detached_domain_is_no_longer_served_by_the_thread(t: ThreadHarness) -> None:
    t.submit(attach(1, EP))
    t.submit(detach(1, EP))
    assert t.submit(map_(1, 0, PAGE - 1, 0)) == Status.S_NOENT


def test_per_domain_limit_holds_for_maps_served_by_the_thread(
        make: Callable[..., ThreadHarness]) -> None:
    t = make(max_mappings_per_domain=3)
    t.submit(attach(1, EP))
    statuses = [t.submit(map_(1, i * PAGE, i * PAGE + PAGE - 1, 0)) for i in range(4)]
    assert statuses == [Status.S_OK] * 3 + [Status.S_NOMEM]


def test_total_limit_holds_for_maps_served_by_the_thread(
        make: Callable[..., ThreadHarness]) -> None:
    t = make(max_mappings_per_domain=3, max_mappings=4)
    t.submit(attach(1, EP))
    t.submit(attach(2, EP2))
    statuses = [t.submit(map_(1 + i % 2, i * PAGE, i * PAGE + PAGE - 1, 0))
                for i in range(5)]
    assert statuses == [Status.S_OK] * 4 + [Status.S_NOMEM]


def test_unmap_that_would_split_a_mapping_is_range_and_removes_nothing(
        t: ThreadHarness) -> None:
    t.submit(attach(1, EP))
    t.submit(map_(1, 0, 2 * PAGE - 1, 0))
    assert t.submit(unmap(1, 0, PAGE - 1)) == Status.S_RANGE
    assert t.mappings(1) == [(0, 2 * PAGE - 1, 0)]


def test_map_without_map_unmap_negotiated_is_unsupp(
        make: Callable[..., ThreadHarness]) -> None:
    t = make(features=ALL_FEATURES & ~(1 << Feature.F_MAP_UNMAP))
    t.submit(attach(1, EP))
    assert t.submit(map_(1, 0, PAGE - 1, 0)) == Status.S_UNSUPP


def test_kicks_are_suppressed_while_polling_and_back_on_when_idle(
        make: Callable[..., ThreadHarness]) -> None:
    t = make(poll_us=300_000, adaptive=False)  # a fixed window: always 300 ms
    t.submit(attach(1, EP))
    t.submit(map_(1, 0, PAGE - 1, 0))
    with t.lock:
        assert t.driver.vq.kicks_suppressed
    # Inside the window a request needs no kick.
    assert t.submit(map_(1, PAGE, 2 * PAGE - 1, 0), kick=False) == Status.S_OK
    deadline = time.monotonic() + 5
    while True:
        with t.lock:
            if not t.driver.vq.kicks_suppressed:
                break
        assert time.monotonic() < deadline, "kicks stayed suppressed after the window"
        time.sleep(0.05)


def test_request_published_as_the_thread_falls_asleep_is_still_served(
        make: Callable[..., ThreadHarness]) -> None:
    t = make(poll_us=50)
    t.submit(attach(1, EP))
    for i in range(200):  # each lands at a random point of the poll-then-sleep cycle
        time.sleep(0.0001 * (i % 7))
        assert t.submit(map_(1, i * PAGE, i * PAGE + PAGE - 1, 0), kick=None) == Status.S_OK


def test_stopping_mid_hand_off_gives_the_chain_back_to_the_ring(t: ThreadHarness) -> None:
    t.driver.post(attach(1, EP), 4)
    t.kick_now()
    deadline = time.monotonic() + 5
    while True:
        with t.lock:
            if t.service.server.handing_off:
                break
        assert time.monotonic() < deadline
        time.sleep(0.001)
    with t.lock:
        t.service.stop()
        t.driver.vq.stop()  # as GET_VRING_BASE does: the base excludes the unanswered chain
        assert t.driver.vq.last_avail == 0
        t.driver.vq.start()
        t.driver.vq.process_requests(t.device.handle_request)
    assert t.driver.take_used()[0][1] == 4
    assert t.device.endpoints[EP].domain == 1  # the fixture's close stops it again: a no-op


def test_malformed_chains_get_used_length_0_from_the_thread_and_reach_no_handler(
        t: ThreadHarness) -> None:
    outside = t.driver.add_chain([(0x10, 36, False), (t.driver.alloc(4), 4, True)])
    t.driver.publish(outside)  # a buffer outside guest RAM
    unknown = t.driver.post(bytes([0x42]) + bytes(35), 4)[0]  # no such request type
    short = t.driver.post(map_(1, 0, PAGE - 1, 0)[:20], 4)[0]  # MAP cut short
    t.kick_now()
    t.wait_used(3)
    assert t.driver.take_used() == [(outside, 0), (unknown, 0), (short, 0)]
    counters = t.counters()
    assert counters["served_by_thread"] == 0 and counters["handed_to_python"] == 0
    with t.lock:
        t.service.drain()
        assert not t.device.requests.trace


def test_broken_ring_is_handed_to_python_which_raises_ring_error(t: ThreadHarness) -> None:
    t.driver.set_avail_idx(1000)  # more than the ring size ahead
    t.kick_now()
    deadline = time.monotonic() + 5
    while not t.ring_errors:
        assert time.monotonic() < deadline
        t.serve_wakeups(0.01)
    assert "avail index 1000" in t.ring_errors[0]


def test_records_past_the_record_buffer_are_still_counted() -> None:
    from viommu._dataplane import MapRules, RequestServer

    driver = FakeDriver(queue_size=64, mem_size=4 << 20)
    device = VirtioIommuDevice([EP])
    device.driver_features = ALL_FEATURES
    lock = DataplaneLock()
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    driver.post(attach(1, EP), 4)
    driver.vq.process_requests(device.handle_request)
    with lock:
        server = RequestServer(lock, driver.vq, kick, 0.0, 2)
        server.configure(True, MapRules(PAGE, 3, None, (MSI, MSI + 0xFFFFF), 100, 100))
        server.set_domains(device.map_domains())
        server.start()
    for i in range(5):
        driver.post(map_(1, i * PAGE, i * PAGE + PAGE - 1, 0), 4)
    os.eventfd_write(kick, 1)
    deadline = time.monotonic() + 5
    while driver.used_idx() != 6:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    with lock:
        records, dropped_map, dropped_unmap = server.drain()
        server.stop()
        server.close()
    os.close(kick)
    assert (len(records), dropped_map, dropped_unmap) == (2, 3, 0)
    device.requests.count_unrecorded(RequestType.VIRTIO_IOMMU_T_MAP, dropped_map)
    assert (device.requests.counts["MAP"], device.requests.dropped) == (3, 3)


# --- the thread and Python agree on every status ------------------------------------------

# Mostly requests that can succeed, so limits, overlaps and splits are reached; some at
# the edges (reserved window, unaligned, wrapping, top of the input range, bad flags).
ADDRS = st.one_of(*[st.sampled_from([0, PAGE, 2 * PAGE, 3 * PAGE])] * 4,
                  st.sampled_from([MSI, 0x800, (1 << 48) - PAGE, (1 << 64) - PAGE]))
SIZES = st.sampled_from([PAGE, PAGE, 2 * PAGE, 3 * PAGE, 0x800, 0])
MAP_FLAGS = st.sampled_from([3, 3, 1, 2, 0, 4, 0x10])
DOMAINS = st.sampled_from([1, 2, 1, 2, 1, 2, 3])
OPS = st.one_of(
    st.builds(lambda d, e: attach(d, e), st.sampled_from([1, 2]), st.sampled_from([EP, EP2])),
    st.builds(lambda d, e: detach(d, e), st.sampled_from([1, 2]), st.sampled_from([EP, EP2])),
    st.builds(lambda d, a, n, p, f: map_(d, a, (a + n - 1) % (1 << 64), p, f),
              DOMAINS, ADDRS, SIZES, ADDRS, MAP_FLAGS),
    st.builds(lambda d, a, n, p, f: map_(d, a, (a + n - 1) % (1 << 64), p, f),
              DOMAINS, ADDRS, SIZES, ADDRS, MAP_FLAGS),
    st.builds(lambda d, a, n, r: unmap(d, a, (a + n - 1) % (1 << 64), r),
              DOMAINS, ADDRS, SIZES, st.sampled_from([0, 0, 0, 1])),
)
SETUP = [attach(1, EP), attach(2, EP2)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=40))
def test_thread_and_python_answer_every_request_sequence_alike(ops: list[bytes]) -> None:
    config = {"max_mappings_per_domain": 3, "max_mappings": 4}
    python = Harness(**config)
    threaded = ThreadHarness(**config)
    try:
        for op in SETUP + ops:
            assert threaded.submit(op) == python.status(op), op.hex()
        for domain in (1, 2, 3):
            expected = ([(m.virt_start, m.virt_end, m.phys_start)
                         for m in python.device.domains[domain].mappings]
                        if domain in python.device.domains else [])
            assert threaded.mappings(domain) == expected
    finally:
        threaded.close()


# --- the busy-poll window adapts; the null device -------------------------------------------

def test_back_to_back_requests_find_the_thread_polling(
        make: Callable[..., ThreadHarness]) -> None:
    t = make(poll_us=20_000)
    t.submit(attach(1, EP))
    for i in range(200):
        t.submit(map_(1, i * PAGE, i * PAGE + PAGE - 1, 0), kick=None)
    counters = t.counters()
    assert counters["poll_hits"] > 0 and counters["poll_adaptive"]
    assert counters["poll_window_us"] <= 20_000  # 0 in a cool-down, on a busy host


def test_null_device_answers_every_request_ok_and_does_nothing(
        make: Callable[..., ThreadHarness]) -> None:
    from test_requests import probe
    t = make(null_device=True)
    assert t.submit(map_(9, 0, PAGE - 1, 0)) == Status.S_OK  # no such domain
    assert t.submit(attach(1, 0xDEAD)) == Status.S_OK  # no such endpoint
    head, wgpa = t.driver.post(probe(EP), 64 + 4)
    t.kick_now()
    t.wait_used(3)
    assert t.driver.take_used() == [(head, 68)]
    assert t.driver.read(wgpa + 64, 1)[0] == Status.S_OK
    counters = t.counters()
    assert counters["served_by_thread"] == 3 and counters["handed_to_python"] == 0
    assert t.mappings(9) == [] and not t.device.domains
