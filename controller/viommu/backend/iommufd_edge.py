"""The iommufd host edge of a backend: a real host's IO page faults and SMMUv3 events for
our endpoints, read from iommufd's fault and vEVENTQ fds (viommu.transport.iommufd says how
a VMM gets them), go to the same relays as injected ones."""

from __future__ import annotations

import logging

from viommu.events.page_requests import Announcer, PageRequestRelay, ResponseCode
from viommu.events.relay import EventRelay
from viommu.transport.iommufd import FaultGroup, FaultQueue, PriMustBeDisabled, VeventQueue
from viommu.transport.sockets import Readers

log = logging.getLogger(__name__)


class IommufdEdge:
    def __init__(self, relay: EventRelay, page_requests: PageRequestRelay,
                 announcer: Announcer) -> None:
        self.relay = relay
        self.page_requests = page_requests
        self.announcer = announcer
        self.queues: list[FaultQueue | VeventQueue] = []

    def attach(self, fault_fd: int | None, veventq_fd: int | None, dev_to_sid: dict[int, int],
               readers: Readers) -> list[FaultQueue | VeventQueue]:
        """Read the fault fd and/or the vEVENTQ fd on `readers`. `dev_to_sid` maps iommufd
        device IDs to endpoint IDs (vDEVICE virt_id = endpoint)."""
        queues: list[FaultQueue | VeventQueue] = []
        if fault_fd is not None:
            fault_queue = FaultQueue(fault_fd, dev_to_sid)
            fault_queue.on_group = lambda group: self._fault_group(fault_queue, group)
            queues.append(fault_queue)
        if veventq_fd is not None:
            queues.append(VeventQueue(veventq_fd, self.relay.submit, self._events_lost))
        for queue in queues:
            readers.add_reader(queue.fileno(), queue.on_readable)
        self.queues += queues
        return queues

    def _fault_group(self, queue: FaultQueue, group: FaultGroup) -> None:
        def respond(code: ResponseCode) -> None:
            try:
                queue.respond(group.cookie, code)
            except PriMustBeDisabled as exc:
                log.warning("%s", exc)
                self.announcer.emit("PRI_DISABLE_NEEDED",
                                    {"sid": group.sid, "cookie": group.cookie})

        for request in group.requests:
            self.page_requests.submit(request, respond)

    def _events_lost(self, count: int) -> None:
        self.relay.note_upstream_lost(count, "the host's vEVENTQ overflowed")
        self.announcer.emit("EVENTS_LOST", {"count": count, "where": "host vEVENTQ"})
