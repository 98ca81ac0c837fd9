"""The event relay: SMMUv3 event records and page requests in, virtio-iommu fault records out
to the eventq.

Nothing vanishes silently. A record waits in a bounded FIFO while the guest has posted no
eventq buffer; past the bound it is counted as lost; records of a PASID that was unbound are
drained (counted) so no stale fault reaches the next address space on that PASID. Every
event is accounted for:
injected = delivered + pending + lost + not_forwarded + drained.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

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

# Writes one encoded fault record into a guest buffer; False when none is posted.
Push = Callable[[bytes], bool]


class EventSink(Protocol):
    """Where fault records go: the guest's eventq (viommu.dataplane.eventq)."""

    def push(self, record: bytes) -> bool:
        """Write one record into the next posted buffer; False when there is none."""
        ...

    def notify(self) -> None:
        """Records were written: tell the driver (if it wants to be told)."""
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
        return out


class EventRelay:
    def __init__(self, capacity: int = 1024, trace_len: int = 4096) -> None:
        self.capacity = capacity
        self._fifo: deque[TraceEntry] = deque()
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
        self.extended = False
        self.sink: EventSink | None = None
        self._host_event_log = RateLimit(HOST_EVENT_LOG_BURST, HOST_EVENT_LOG_WINDOW_S)

    def attach_sink(self, sink: EventSink) -> None:
        """Deliver to `sink` as records arrive (and on `deliver()`, when it has buffers)."""
        self.sink = sink

    @property
    def pending(self) -> int:
        return sum(1 for entry in self._fifo if not entry.is_summary)

    def submit(self, event: EventRecord) -> TraceEntry:
        """Accept one SMMUv3 event and deliver what the guest has buffers for. It waits in
        the FIFO if the guest has none, is counted lost if the FIFO is full, and is not
        forwarded if it is a host-side error."""
        entry = self._accept(event)
        self.deliver()
        return entry

    def submit_burst(self, event: EventRecord, count: int) -> list[TraceEntry]:
        """`count` copies of one event in time proportional to what the FIFO can take, not
        to `count`: the copies that do not fit are counted lost at once (one trace entry
        says how many), so a huge burst never stalls the loop that serves the guest. The
        guest gets them after the whole burst is queued."""
        if count < 1:
            return []
        first = self._accept(event)
        if first.state == "not-forwarded":
            self.injected += count - 1
            self.not_forwarded += count - 1
            if count > 1:
                self._log_host_event(first, count - 1)
            return [first]
        entries = [first]
        while len(entries) < count and len(self._fifo) < self.capacity:
            entries.append(self._accept(event))
        rest = count - len(entries)
        if rest:
            entries.append(self._count_lost_copies(event, first.fault, rest))
        self.deliver()
        return entries

    def _accept(self, event: EventRecord) -> TraceEntry:
        try:
            fault = fault_from_event(event)
        except NotForwarded as exc:
            entry = self._new_entry(None, "not-forwarded", event=event, note=str(exc))
            self.not_forwarded += 1
            self._log_host_event(entry, 1)
            return entry
        return self._queue(self._new_entry(fault, "pending", event=event))

    def _count_lost_copies(self, event: EventRecord, fault: FaultRecord | None,
                           copies: int) -> TraceEntry:
        self.injected += copies
        self.lost += copies
        if not self._lost_unreported:
            self._lost_sid = event.sid
        self._lost_unreported += copies
        lost = TraceEntry(self._seq + 1, time.time(), fault, "lost", event=event,
                          note=f"{copies} copies lost: event FIFO full ({self.capacity} records)")
        self._seq += copies
        self.trace.append(lost)
        log.warning("event FIFO full (%d records): %d copies of %s counted lost",
                    self.capacity, copies, event.name)
        return lost

    def submit_page_request(self, request: PageRequest) -> TraceEntry:
        """Accept one page request as a fault record for the guest."""
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
                self._lost_sid = entry.sid
                log.warning("event FIFO full (%d records): counting events lost until the "
                            "guest takes some", self.capacity)
            self._lost_unreported += 1
        else:
            self._fifo.append(entry)
        self._log(entry)
        return entry

    def _queue_summary(self) -> None:
        """Once there is room again, one UNKNOWN record without an address tells the guest
        that events were lost, as iommufd's LOST_EVENTS header tells a VMM."""
        if not self._lost_unreported or len(self._fifo) >= self.capacity:
            return
        count, self._lost_unreported = self._lost_unreported, 0
        fault = FaultRecord(FaultReason.UNKNOWN, 0, self._lost_sid)
        entry = TraceEntry(0, time.time(), fault, "pending", lost_count=count,
                           note=f"{count} event(s) lost to FIFO overflow")
        self._fifo.append(entry)
        self.trace.append(entry)
        log.warning("event FIFO: %d event(s) were lost; a summary record is queued", count)

    def deliver(self) -> int:
        """Deliver waiting records to the attached sink, then notify it once."""
        if self.sink is None:
            return 0
        delivered = self.flush(self.sink.push)
        if delivered:
            self.sink.notify()
        return delivered

    def flush(self, push: Push) -> int:
        """Deliver waiting records in order until the guest runs out of buffers."""
        delivered = 0
        while self._fifo:
            entry = self._fifo[0]
            if not push(entry.fault.encode(self.extended)):
                break
            self._fifo.popleft()
            entry.state = "delivered"
            if entry.is_summary:
                self.summaries += 1
            else:
                self.delivered += 1
            delivered += 1
            self._log(entry)
            self._queue_summary()
        return delivered

    def drop_pending(self, why: str) -> int:
        """The guest that these records were for is gone (device reset): count them lost."""
        dropped = 0
        while self._fifo:
            entry = self._fifo.popleft()
            if entry.is_summary:
                continue
            entry.state, entry.note = "lost", why
            self.lost += 1
            dropped += 1
            self._log(entry)
        self._lost_unreported = 0  # the guest that would read the summary is gone too
        return dropped

    def drain(self, sid: int, pasid: int | None, why: str) -> int:
        """Remove the waiting records of one stream's PASID (it was unbound): they belong to
        an address space that no longer exists and must not reach the next one."""
        keep: deque[TraceEntry] = deque()
        drained = 0
        for entry in self._fifo:
            if not entry.is_summary and entry.sid == sid and (pasid is None
                                                              or entry.pasid == pasid):
                entry.state, entry.note = "drained", why
                self.drained += 1
                drained += 1
                self._log(entry)
            else:
                keep.append(entry)
        self._fifo = keep
        return drained

    def note_upstream_lost(self, count: int, why: str) -> None:
        """Events lost before the relay saw them: counted and logged, never silent."""
        self.upstream_lost += count
        log.warning("%d event(s) lost upstream: %s", count, why)

    def counters(self) -> dict:
        return {"injected": self.injected, "delivered": self.delivered,
                "pending": self.pending, "lost": self.lost,
                "not_forwarded": self.not_forwarded, "drained": self.drained,
                "upstream_lost": self.upstream_lost, "summaries": self.summaries,
                # summary records queued behind the events, not yet delivered
                "summaries_pending": len(self._fifo) - self.pending,
                "capacity": self.capacity, "to_absent_endpoints": self.to_absent_endpoints}

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
