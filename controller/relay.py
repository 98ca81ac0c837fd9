"""The event relay: SMMUv3 event records in, virtio-iommu fault records out to the eventq.

Nothing vanishes silently. A record waits in a bounded FIFO while the guest has posted no
eventq buffer; past the bound it is counted as lost. Every event is accounted for:
injected = delivered + pending + lost + not_forwarded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable

from viommu.faults import FaultRecord, NotForwarded, fault_from_event
from viommu.smmuv3 import EventRecord

log = logging.getLogger("viommu.relay")

# Writes one encoded fault record into a guest buffer; False when none is posted.
Sink = Callable[[bytes], bool]


@dataclasses.dataclass
class TraceEntry:
    seq: int
    time: float
    event: EventRecord
    fault: FaultRecord | None
    state: str  # pending, delivered, lost, not-forwarded
    note: str = ""

    def to_dict(self) -> dict:
        out = {"seq": self.seq, "time": self.time, "type": self.event.name,
               "sid": self.event.sid, "state": self.state, "event": self.event.to_dict(),
               "record": self.event.encode().hex()}
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
        self.on_state_change: list[Callable[[TraceEntry], None]] = []

    @property
    def pending(self) -> int:
        return len(self._fifo)

    def submit(self, event: EventRecord) -> TraceEntry:
        """Accept one event; it is queued for the guest unless it is host-only or the FIFO
        is full. Call `flush` afterwards to deliver."""
        self._seq += 1
        self.injected += 1
        try:
            fault = fault_from_event(event)
        except NotForwarded as exc:
            entry = TraceEntry(self._seq, time.time(), event, None, "not-forwarded", str(exc))
            self.not_forwarded += 1
            self.trace.append(entry)
            self._log(entry)
            return entry
        entry = TraceEntry(self._seq, time.time(), event, fault, "pending")
        if len(self._fifo) >= self.capacity:
            entry.state, entry.note = "lost", f"event FIFO full ({self.capacity} records)"
            self.lost += 1
        else:
            self._fifo.append(entry)
        self.trace.append(entry)
        self._log(entry)
        return entry

    def flush(self, sink: Sink) -> int:
        """Deliver waiting records in order until the guest runs out of buffers."""
        delivered = 0
        while self._fifo:
            entry = self._fifo[0]
            if not sink(entry.fault.encode()):
                break
            self._fifo.popleft()
            entry.state = "delivered"
            self.delivered += 1
            delivered += 1
            self._log(entry)
        return delivered

    def drop_pending(self, why: str) -> int:
        """The guest that these records were for is gone (device reset): count them lost."""
        dropped = len(self._fifo)
        while self._fifo:
            entry = self._fifo.popleft()
            entry.state, entry.note = "lost", why
            self.lost += 1
            self._log(entry)
        return dropped

    def counters(self) -> dict:
        return {"injected": self.injected, "delivered": self.delivered,
                "pending": self.pending, "lost": self.lost,
                "not_forwarded": self.not_forwarded, "capacity": self.capacity}

    def _log(self, entry: TraceEntry) -> None:
        log.info("event #%d %s sid=%d: %s%s", entry.seq, entry.event.name, entry.event.sid,
                 entry.state, f" ({entry.note})" if entry.note else "")
        for listener in self.on_state_change:
            listener(entry)
