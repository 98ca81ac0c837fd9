"""The event relay: SMMUv3 event records and page requests in, virtio-iommu fault records out
to the eventq.

Nothing vanishes silently. A record waits in a bounded FIFO while the guest has posted no
eventq buffer; past the bound it is counted as lost; records of a PASID that was unbound are
drained (counted) so no stale fault reaches the next address space on that PASID. Every
event is accounted for:
injected = delivered + pending + lost + not_forwarded + drained.

The relay decides; its sink holds the records and delivers them (viommu.dataplane.eventq:
on the eventq's own thread, or on the loop). The relay keeps a copy of the sink's queue, of
the entries in the same order, and replays what the sink reports (`sync`): a record went
into a guest buffer, or the summary record went in behind the others. Every method syncs
first, so counters and trace states are exact whenever they are read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import Protocol

from viommu._dataplane import EVENT_SUMMARY_QUEUED
from viommu.dataplane.records import RecordQueue
from viommu.events.faults import (
    FaultRecord,
    NotForwarded,
    fault_from_event,
    fault_from_page_request,
)
from viommu.events.page_requests import PageRequest
from viommu.events.smmuv3 import EventRecord
from viommu.uapi import FaultReason

log = logging.getLogger(__name__)

# Host-side events are logged as warnings, at most this many per window, so that a flood of
# them cannot flood the log (Linux's printk_ratelimit defaults: 10 per 5 s).
HOST_EVENT_LOG_BURST = 10
HOST_EVENT_LOG_WINDOW_S = 5.0
# Delivery latencies kept for query-events (command arrival to used index and notify).
DELIVERY_SAMPLES = 4096


class RateLimit:
    """At most `burst` yeses per `window` seconds; counts the noes until the next yes."""

    def __init__(self, burst: int, window: float, clock=time.monotonic) -> None:
        self.burst = burst
        self.window = window
        self.clock = clock
        self._start = -window
        self._used = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = self.clock()
        if now - self._start >= self.window:
            self._start, self._used = now, 0
        if self._used < self.burst:
            self._used += 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


class EventSink(Protocol):
    """Where fault records go: the guest's eventq (viommu.dataplane.eventq), which holds them
    in order until the driver has buffers (viommu.dataplane.records.RecordQueue says how)."""

    def post(self, record: bytes) -> None:
        """Hold one encoded record behind the others."""
        ...

    def arm_summary(self, record: bytes) -> None:
        """After the next delivery, hold this record behind the others (once)."""
        ...

    def remove(self, positions: list[int]) -> None:
        """Take back the records at these positions (0: the oldest)."""
        ...

    def clear(self) -> None:
        """Drop every record held, and the armed summary."""
        ...

    def deliver(self) -> None:
        """Write what the posted buffers take now, and notify the driver."""
        ...

    def take_report(self) -> list[tuple[int, int]]:
        """What happened since the last call, oldest first: (kind, time_ns)."""
        ...


@dataclasses.dataclass
class TraceEntry:
    seq: int
    time: float
    fault: FaultRecord | None
    state: str  # pending, delivered, lost, not-forwarded, drained
    event: EventRecord | None = None  # an SMMUv3 event...
    request: PageRequest | None = None  # ...or a page request...
    lost_count: int = 0  # ...or the summary of this many events lost to FIFO overflow
    note: str = ""
    arrived_ns: int = 0  # CLOCK_MONOTONIC: when the command that made it arrived (0: none)
    delivered_ns: int = 0  # ...and when it reached the guest's used ring

    @property
    def delivery_us(self) -> float | None:
        if not (self.arrived_ns and self.delivered_ns):
            return None
        return (self.delivered_ns - self.arrived_ns) / 1000

    @property
    def is_summary(self) -> bool:
        return self.lost_count > 0

    @property
    def sid(self) -> int:
        if self.event is not None:
            return self.event.sid
        return self.request.sid if self.request is not None else self.fault.endpoint

    @property
    def pasid(self) -> int | None:
        if self.request is not None:
            return self.request.pasid
        return self.event.ssid if self.event is not None and self.event.ssv else None

    @property
    def name(self) -> str:
        if self.event is not None:
            return self.event.name
        return "PAGE_REQUEST" if self.request is not None else "EVENTS_LOST"

    def to_dict(self) -> dict:
        out = {"seq": self.seq, "time": self.time, "type": self.name, "sid": self.sid,
               "pasid": self.pasid, "state": self.state}
        if self.event is not None:
            out["event"] = self.event.to_dict()
            out["record"] = self.event.encode().hex()
        if self.request is not None:
            out["request"] = self.request.to_dict()
        if self.is_summary:
            out["lost_count"] = self.lost_count
        if self.fault is not None:
            out["fault"] = dataclasses.asdict(self.fault)
            out["fault_record"] = self.fault.encode().hex()
            out["guest_line"] = self.fault.guest_line()
        if self.note:
            out["note"] = self.note
        if self.delivery_us is not None:
            out["delivery_us"] = round(self.delivery_us, 1)
        return out


class EventRelay:
    def __init__(self, capacity: int = 1024, trace_len: int = 4096) -> None:
        self.capacity = capacity
        # What the sink holds, in its order: events and summary records not yet delivered.
        self._fifo: deque[TraceEntry] = deque()
        self._summaries_held = 0  # of them, summary records
        self.trace: deque[TraceEntry] = deque(maxlen=trace_len)
        self._seq = 0
        self.injected = 0
        self.delivered = 0
        self.lost = 0
        self.not_forwarded = 0
        self.drained = 0
        # Events the host dropped before they reached us (iommufd vEVENTQ overflow).
        self.upstream_lost = 0
        # FIFO overflow: lost since the last summary record, and the first one's stream.
        self._lost_unreported = 0
        self._lost_sid = 0
        self.summaries = 0
        # Injected on purpose for endpoints the guest does not have (inject-event force):
        # part of the counts above, and counted apart here.
        self.to_absent_endpoints = 0
        # The driver negotiated viommu's extended fault record (PASID, group ID).
        self._extended = False
        self.sink: EventSink = RecordQueue()  # records wait here until an eventq exists
        # ns from a command's arrival to its record's delivery, the latest ones
        self.delivery_ns: deque[int] = deque(maxlen=DELIVERY_SAMPLES)
        self._host_event_log = RateLimit(HOST_EVENT_LOG_BURST, HOST_EVENT_LOG_WINDOW_S)

    def attach_sink(self, sink: EventSink) -> None:
        """Deliver through `sink` from now on; what the previous one held moves to it."""
        self.sync()
        self.sink = sink
        self._repost()

    @property
    def extended(self) -> bool:
        return self._extended

    @extended.setter
    def extended(self, value: bool) -> None:
        """Records not yet delivered are encoded again for the driver now negotiated."""
        if value != self._extended:
            self.sync()
            self._extended = value
            self._repost()

    def _repost(self) -> None:
        self.sink.clear()
        for entry in self._fifo:
            self.sink.post(entry.fault.encode(self._extended))
        if self._lost_unreported:
            self.sink.arm_summary(self._summary_fault().encode(self._extended))

    @property
    def pending(self) -> int:
        self.sync()
        return len(self._fifo) - self._summaries_held

    def submit(self, event: EventRecord, arrived_ns: int = 0) -> TraceEntry:
        """Accept one SMMUv3 event and deliver what the guest has buffers for. It waits in
        the FIFO if the guest has none, is counted lost if the FIFO is full, and is not
        forwarded if it is a host-side error. `arrived_ns`: when the command that made it
        arrived (CLOCK_MONOTONIC), for the delivery latency."""
        self.sync()
        entry = self._accept(event, arrived_ns)
        self.deliver()
        return entry

    def submit_burst(self, event: EventRecord, count: int,
                     arrived_ns: int = 0) -> list[TraceEntry]:
        """`count` copies of one event in time proportional to what the FIFO can take, not
        to `count`: the copies that do not fit are counted lost at once (one trace entry
        says how many), so a huge burst never stalls the loop that serves the guest. The
        guest gets them after the whole burst is queued."""
        if count < 1:
            return []
        self.sync()
        first = self._accept(event, arrived_ns)
        if first.state == "not-forwarded":
            self.injected += count - 1
            self.not_forwarded += count - 1
            if count > 1:
                self._log_host_event(first, count - 1)
            return [first]
        entries = [first]
        while len(entries) < count and len(self._fifo) < self.capacity:
            entries.append(self._accept(event, arrived_ns))
        rest = count - len(entries)
        if rest:
            entries.append(self._count_lost_copies(event, first.fault, rest))
        self.deliver()
        return entries

    def _accept(self, event: EventRecord, arrived_ns: int = 0) -> TraceEntry:
        try:
            fault = fault_from_event(event)
        except NotForwarded as exc:
            entry = self._new_entry(None, "not-forwarded", event=event, note=str(exc))
            self.not_forwarded += 1
            self._log_host_event(entry, 1)
            return entry
        return self._queue(self._new_entry(fault, "pending", event=event,
                                           arrived_ns=arrived_ns))

    def _count_lost_copies(self, event: EventRecord, fault: FaultRecord | None,
                           copies: int) -> TraceEntry:
        self.injected += copies
        self.lost += copies
        self._note_lost(event.sid, copies)
        lost = TraceEntry(self._seq + 1, time.time(), fault, "lost", event=event,
                          note=f"{copies} copies lost: event FIFO full ({self.capacity} records)")
        self._seq += copies
        self.trace.append(lost)
        log.warning("event FIFO full (%d records): %d copies of %s counted lost",
                    self.capacity, copies, event.name)
        return lost

    def submit_page_request(self, request: PageRequest) -> TraceEntry:
        """Accept one page request as a fault record for the guest."""
        self.sync()
        entry = self._queue(self._new_entry(fault_from_page_request(request), "pending",
                                            request=request))
        self.deliver()
        return entry

    def _new_entry(self, fault: FaultRecord | None, state: str, **source) -> TraceEntry:
        self._seq += 1
        self.injected += 1
        entry = TraceEntry(self._seq, time.time(), fault, state, **source)
        self.trace.append(entry)
        return entry

    def _queue(self, entry: TraceEntry) -> TraceEntry:
        if len(self._fifo) >= self.capacity:
            entry.state, entry.note = "lost", f"event FIFO full ({self.capacity} records)"
            self.lost += 1
            if not self._lost_unreported:
                log.warning("event FIFO full (%d records): counting events lost until the "
                            "guest takes some", self.capacity)
            self._note_lost(entry.sid, 1)
        else:
            self._fifo.append(entry)
            self.sink.post(entry.fault.encode(self._extended))
        self._log(entry)
        return entry

    def _note_lost(self, sid: int, count: int) -> None:
        """Events lost to a full FIFO. The first since the last summary arms the next one:
        once there is room again (after the next delivery), one UNKNOWN record without an
        address tells the guest that events were lost, as iommufd's LOST_EVENTS header
        tells a VMM."""
        if not self._lost_unreported:
            self._lost_sid = sid
            self.sink.arm_summary(self._summary_fault().encode(self._extended))
        self._lost_unreported += count

    def _summary_fault(self) -> FaultRecord:
        return FaultRecord(FaultReason.UNKNOWN, 0, self._lost_sid)

    def sync(self) -> int:
        """Replay what the sink did since the last call; the number of records delivered."""
        delivered = 0
        for kind, time_ns in self.sink.take_report():
            if kind == EVENT_SUMMARY_QUEUED:
                self._summary_queued()
                continue
            entry = self._fifo.popleft()
            entry.state, entry.delivered_ns = "delivered", time_ns
            if entry.is_summary:
                self.summaries += 1
                self._summaries_held -= 1
            else:
                self.delivered += 1
            if entry.arrived_ns:
                self.delivery_ns.append(time_ns - entry.arrived_ns)
            delivered += 1
            self._log(entry)
        return delivered

    def _summary_queued(self) -> None:
        count, self._lost_unreported = self._lost_unreported, 0
        entry = TraceEntry(0, time.time(), self._summary_fault(), "pending", lost_count=count,
                           note=f"{count} event(s) lost to FIFO overflow")
        self._fifo.append(entry)
        self._summaries_held += 1
        self.trace.append(entry)
        log.warning("event FIFO: %d event(s) were lost; a summary record is queued", count)

    def deliver(self) -> int:
        """Have the sink deliver what the guest has buffers for; the number delivered."""
        self.sync()
        self.sink.deliver()
        return self.sync()

    def drop_pending(self, why: str) -> int:
        """The guest that these records were for is gone (device reset): count them lost."""
        self.sync()
        dropped = 0
        for entry in self._fifo:
            if entry.is_summary:
                continue
            entry.state, entry.note = "lost", why
            self.lost += 1
            dropped += 1
            self._log(entry)
        self._fifo.clear()
        self._summaries_held = 0
        self.sink.clear()
        self._lost_unreported = 0  # the guest that would read the summary is gone too
        return dropped

    def drain(self, sid: int, pasid: int | None, why: str) -> int:
        """Remove the waiting records of one stream's PASID (it was unbound): they belong to
        an address space that no longer exists and must not reach the next one."""
        self.sync()
        keep: deque[TraceEntry] = deque()
        removed: list[int] = []
        for position, entry in enumerate(self._fifo):
            if not entry.is_summary and entry.sid == sid and (pasid is None
                                                              or entry.pasid == pasid):
                entry.state, entry.note = "drained", why
                self.drained += 1
                removed.append(position)
                self._log(entry)
            else:
                keep.append(entry)
        if removed:
            self.sink.remove(removed)
        self._fifo = keep
        return len(removed)

    def note_upstream_lost(self, count: int, why: str) -> None:
        """Events lost before the relay saw them: counted and logged, never silent."""
        self.upstream_lost += count
        log.warning("%d event(s) lost upstream: %s", count, why)

    def counters(self) -> dict:
        self.sync()
        return {"injected": self.injected, "delivered": self.delivered,
                "pending": self.pending, "lost": self.lost,
                "not_forwarded": self.not_forwarded, "drained": self.drained,
                "upstream_lost": self.upstream_lost, "summaries": self.summaries,
                # summary records queued behind the events, not yet delivered
                "summaries_pending": self._summaries_held,
                "capacity": self.capacity, "to_absent_endpoints": self.to_absent_endpoints}

    def delivery_latency(self) -> dict:
        """Command arrival to the record in the used ring and the driver notified, over the
        latest deliveries: median and p99 in µs."""
        self.sync()
        samples = sorted(self.delivery_ns)
        if not samples:
            return {"samples": 0, "median_us": None, "p99_us": None}

        def percentile(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] / 1000

        return {"samples": len(samples), "median_us": percentile(0.5),
                "p99_us": percentile(0.99)}

    def _log(self, entry: TraceEntry) -> None:
        log.debug("event #%d %s sid=%#x: %s%s", entry.seq, entry.name, entry.sid, entry.state,
                  f" ({entry.note})" if entry.note else "")

    def _log_host_event(self, entry: TraceEntry, copies: int) -> None:
        """A host-side error is the host's to act on: a warning in the log (rate-limited),
        since the guest never hears of it."""
        if not self._host_event_log.allow():
            self._host_event_log.suppressed += copies - 1
            return
        suppressed = self._host_event_log.take_suppressed()
        log.warning("%s for stream %#x (event #%d%s): a host-side error, not forwarded to the "
                    "guest%s", entry.name, entry.sid, entry.seq,
                    f", and {copies - 1} more like it" if copies > 1 else "",
                    f"; {suppressed} more host-side event(s) were not logged (rate limit)"
                    if suppressed else "")
