"""The requests a device served: counters by type and status, and a bounded trace.

Both request paths report here: the device itself (every request it decides) and the
request thread (the MAP/UNMAP it served in C with S_OK, drained in ring order).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import NamedTuple

from viommu.uapi import RequestType, Status

# Which request fields the trace keeps, by type (the names of the parsed request's fields).
_FIELDS = {
    RequestType.VIRTIO_IOMMU_T_ATTACH: ("domain", "endpoint", "flags"),
    RequestType.VIRTIO_IOMMU_T_DETACH: ("domain", "endpoint"),
    RequestType.VIRTIO_IOMMU_T_MAP: ("domain", "virt_start", "virt_end", "phys_start",
                                     "flags"),
    RequestType.VIRTIO_IOMMU_T_UNMAP: ("domain", "virt_start", "virt_end"),
    RequestType.VIRTIO_IOMMU_T_PROBE: ("endpoint",),
    RequestType.VIRTIO_IOMMU_T_ATTACH_TABLE: ("domain", "endpoint", "format"),
    RequestType.VIRTIO_IOMMU_T_INVALIDATE: ("domain", "scope", "caches", "flags", "address",
                                            "nr_pages"),
    RequestType.VIRTIO_IOMMU_T_PAGE_RESP: ("domain", "endpoint"),
}


class ServedRequest(NamedTuple):
    """A MAP or UNMAP served by the request thread, as the trace records requests."""

    type: RequestType
    domain: int
    virt_start: int
    virt_end: int
    phys_start: int
    flags: int

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def type_name(req_type: int) -> str:
    return RequestType(req_type).name.removeprefix("VIRTIO_IOMMU_T_")


class RequestLog:
    def __init__(self, trace_len: int = 4096) -> None:
        self.counts: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.trace: deque[dict] = deque(maxlen=trace_len)
        self.dropped = 0  # served and counted, but not in the trace
        self._seq = 0

    def record(self, req, status: int, when: float | None = None) -> None:
        """One request (a parsed request or a ServedRequest) and the status it got."""
        self._seq += 1
        name = req.type_name
        entry = {"seq": self._seq, "time": time.time() if when is None else when,
                 "type": name, "status": Status(status).name}
        for field in _FIELDS.get(req.type, ()):
            entry[field] = getattr(req, field)
        if req.type == RequestType.VIRTIO_IOMMU_T_ATTACH_TABLE:
            entry["ste"] = [f"{req.ste0:#018x}", f"{req.ste1:#018x}"]
        self.counts[name] += 1
        self.statuses[Status(status).name] += 1
        self.trace.append(entry)

    def record_served(self, when: float, req_type: int, domain: int, virt_start: int,
                      virt_end: int, phys_start: int, flags: int) -> None:
        """A MAP or UNMAP the request thread served (S_OK)."""
        self.record(ServedRequest(RequestType(req_type), domain, virt_start, virt_end,
                                  phys_start, flags), Status.S_OK, when)

    def count_unrecorded(self, req_type: int, count: int) -> None:
        """Requests served with S_OK whose trace entries were lost (a full record buffer)."""
        if count:
            self.counts[type_name(req_type)] += count
            self.statuses[Status.S_OK.name] += count
            self.dropped += count
