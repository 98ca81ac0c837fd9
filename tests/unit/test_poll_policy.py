"""The request thread's busy-poll policy (ext/poll_policy.pxi), fed by hand: the window
grows when a request just missed it, shrinks when requests come further apart than it may
poll, is kept when it finds work, and goes to nothing for a cool-down when the poller is
preempted while polling (someone else wanted its core)."""

from __future__ import annotations

from viommu._dataplane import PollPolicy

US = 1000
GROW_START = 10 * US


def test_the_window_starts_small_and_a_fixed_one_is_the_cap() -> None:
    assert PollPolicy(200).window_ns == GROW_START
    assert PollPolicy(5).window_ns == 5 * US
    assert PollPolicy(200, adaptive=False).window_ns == 200 * US


def test_a_request_polling_could_have_caught_doubles_the_window_up_to_the_cap() -> None:
    p = PollPolicy(100)
    windows = []
    for _ in range(5):
        p.unpolled(90 * US)  # within the cap: polling longer would have caught it
        windows.append(p.window_ns // US)
    assert windows == [20, 40, 80, 100, 100]
    assert p.counters()["poll_grows"] == 4


def test_requests_further_apart_than_the_cap_halve_it_down_to_none() -> None:
    p = PollPolicy(200)
    for _ in range(4):
        p.unpolled(p.window_ns + 1 * US)
    assert p.window_ns == 160 * US
    windows = []
    for _ in range(5):
        p.unpolled(5_000 * US)  # an idle guest: polling could never catch these
        windows.append(p.window_ns // US)
    assert windows == [80, 40, 20, 10, 0]
    p.unpolled(5_000 * US)
    assert p.window_ns == 0


def test_a_burst_after_idleness_polls_again() -> None:
    p = PollPolicy(200)
    p.unpolled(10_000 * US)
    assert p.window_ns == 0
    p.unpolled(3 * US)  # a kick right after the last answer: requests back to back
    assert p.window_ns == GROW_START


def test_a_window_that_finds_work_is_kept() -> None:
    p = PollPolicy(200)
    p.unpolled(15 * US)
    for _ in range(100):
        p.hit(wall_ns=8 * US, cpu_ns=8 * US)
    assert p.window_ns == 20 * US
    assert p.counters()["poll_hits"] == 100


def test_a_preempted_poller_stops_polling_for_a_cool_down_that_doubles() -> None:
    p = PollPolicy(200)
    p.hit(wall_ns=1_000 * US, cpu_ns=200 * US, preemptions=1)  # 800 µs to another thread
    assert p.window_ns == 0 and p.cooldown_left == 16
    for _ in range(15):
        p.unpolled(3 * US)  # served on kicks, however close together
        assert p.window_ns == 0
    p.unpolled(3 * US)
    assert p.window_ns == GROW_START and p.cooldown_left == 0  # tries a small window again
    p.miss(wall_ns=500 * US, cpu_ns=100 * US, preemptions=2)  # still contended
    assert p.window_ns == 0 and p.cooldown_left == 32
    assert p.counters()["poll_backoffs"] == 2


def test_as_many_undisturbed_polls_as_the_cool_down_is_long_halve_it() -> None:
    p = PollPolicy(200)
    for _ in range(3):
        p.miss(wall_ns=500 * US, cpu_ns=0, preemptions=1)
        for _ in range(p.cooldown_left):
            p.unpolled(3 * US)
    assert p.cooldown_left == 0  # the next cool-down would be 128 requests
    for _ in range(127):
        p.hit(wall_ns=5 * US, cpu_ns=5 * US)
    p.miss(wall_ns=500 * US, cpu_ns=0, preemptions=1)
    assert p.cooldown_left == 128  # a few clean polls are no sign that contention is over
    for _ in range(p.cooldown_left):
        p.unpolled(3 * US)
    for _ in range(256 + 128):
        p.hit(wall_ns=5 * US, cpu_ns=5 * US)
    p.miss(wall_ns=500 * US, cpu_ns=0, preemptions=1)
    assert p.cooldown_left == 64  # 256, halved after 256 clean polls, then after 128


def test_scheduling_noise_is_not_contention() -> None:
    p = PollPolicy(200)
    p.hit(wall_ns=40 * US, cpu_ns=25 * US, preemptions=1)  # 15 µs: below the noise floor
    p.miss(wall_ns=400 * US, cpu_ns=350 * US, preemptions=1)  # 50 µs of 400: not a quarter
    assert p.window_ns == GROW_START and p.counters()["poll_backoffs"] == 0


def test_waiting_for_the_lock_is_not_contention() -> None:
    p = PollPolicy(200)
    p.hit(wall_ns=1_000 * US, cpu_ns=10 * US, preemptions=0)  # asleep on the mutex
    assert p.window_ns == GROW_START and p.counters()["poll_backoffs"] == 0


def test_no_cap_never_polls_and_a_fixed_window_ignores_everything() -> None:
    p = PollPolicy(0)
    p.unpolled(1 * US)
    assert p.window_ns == 0
    fixed = PollPolicy(200, adaptive=False)
    fixed.miss(wall_ns=1_000 * US, cpu_ns=0, preemptions=5)
    fixed.unpolled(10_000 * US)
    assert fixed.window_ns == 200 * US
