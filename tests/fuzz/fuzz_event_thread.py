"""Fuzz the eventq thread (ext/eventq.pxi, viommu.dataplane.eventq) against the Python path.

The fuzzer drives two devices' eventqs the same way: injections (single events and bursts,
of any stream and PASID, host-only events that are not forwarded, more than the FIFO
holds), buffers posted with and without a kick (of any size, split over descriptors, not
writable, outside guest RAM), PASID drains, resets, the extended record switched on and
off, the ring stopped and started again, its call fd replaced, and the ring broken by an
avail index too far ahead. Device A's records are served by an EventServer thread, device
B's by a RecordQueue on the "loop". After every step, once A's thread has delivered what it
can, both must have put the same used entries with the same bytes in the guest's ring,
notified the driver alike, counted the same (injected = delivered + pending + lost +
not_forwarded + drained, on both) and agree on whether the ring is broken; after the last,
the same trace states. The thread must deliver within seconds (no hang) and leave no fd or
thread behind.
"""

from __future__ import annotations

import atheris
import fuzzutil
from fuzzutil import check, pick

with fuzzutil.instrumented(__name__):
    from threaded_eventq import EventqGuest  # imports viommu.dataplane.eventq: instrumented

    from viommu.events.smmuv3 import EventId

STREAMS = (0x100, 0x200, 0x7)
EVENTS = (EventId.F_TRANSLATION, EventId.F_PERMISSION, EventId.C_BAD_STE, EventId.C_BAD_CD,
          EventId.F_STREAM_DISABLED, EventId.C_BAD_STREAMID, EventId.F_STE_FETCH)
SIZES = (24, 24, 24, 32, 16, 8, 0x1000)


def step(fdp: atheris.FuzzedDataProvider) -> tuple:
    """One thing the guest, the host or the backend does, as data both devices replay
    (EventqGuest.replay)."""
    kind = fdp.ConsumeIntInRange(0, 11)
    if kind <= 3:
        count = pick(fdp, (1, 1, 2, 3, fdp.ConsumeIntInRange(1, 40)))
        return ("inject", count, pick(fdp, STREAMS), pick(fdp, (None, None, 1, 2)),
                pick(fdp, EVENTS), fdp.ConsumeIntInRange(0, 1 << 20) << 12)
    if kind <= 6:
        return ("post", fdp.ConsumeIntInRange(0, 8), pick(fdp, SIZES), fdp.ConsumeBool())
    if kind == 7:
        shape = fdp.ConsumeIntInRange(0, 3)
        parts = {0: [(12, True), (12, True)], 1: [(24, False)], 2: [(8, False), (24, True)],
                 3: [(24, True)]}[shape]
        return ("chain", tuple(parts), shape == 3 and fdp.ConsumeBool(), fdp.ConsumeBool())
    if kind == 8:
        return ("drain", pick(fdp, STREAMS), pick(fdp, (None, 1, 2)))
    if kind == 9:
        return pick(fdp, (("reset",), ("extended", True), ("extended", False)))
    if kind == 10:
        return pick(fdp, (("restart",), ("call",), ("restart",), ("call",), ("break",)))
    return ("nothing",)


def accounted(c: dict) -> bool:
    return c["injected"] == (c["delivered"] + c["pending"] + c["lost"] + c["not_forwarded"]
                             + c["drained"])


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    capacity = pick(fdp, (1, 2, 4, 8, 64))
    with fuzzutil.nothing_left_behind("the event thread"):
        threaded, python = EventqGuest(True, capacity), EventqGuest(False, capacity)
        compare(fdp, threaded, python)


def compare(fdp: atheris.FuzzedDataProvider, threaded: EventqGuest,
            python: EventqGuest) -> None:
    try:
        for _ in range(fdp.ConsumeIntInRange(1, 24)):
            op = step(fdp)
            for g in (threaded, python):
                g.replay(op)
            check(threaded.take_received() == python.take_received(),
                  f"the guests got different records after {op}")
            check(threaded.notified() == python.notified(), f"notified differently: {op}")
            check(bool(threaded.broken) == bool(python.broken), f"ring broken on one side: {op}")
            mine, theirs = threaded.counters(), python.counters()
            check(mine == theirs, f"counters {mine} != {theirs} after {op}")
            check(accounted(mine), f"accounting broken: {mine}")
        with threaded.lock, python.lock:
            check([(e.seq, e.state, e.lost_count) for e in threaded.relay.trace]
                  == [(e.seq, e.state, e.lost_count) for e in python.relay.trace],
                  "trace states differ")
    finally:
        threaded.close()
        python.close()


if __name__ == "__main__":
    fuzzutil.run(one_input)
