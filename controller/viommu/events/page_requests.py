"""Page requests (PCIe PRI, PCIe 6.x 10.4) and their groups: collected, relayed to the
guest, and answered exactly once, whatever their source: our DMA endpoint, an injected
request, or an iommufd fault queue on a real host.

A page request group (PRG) is one or more requests with the same group index from one
function (and PASID); only the last carries L=1, and only it gets a PRG Response, one per
group. A Stop Marker is a request with L=1 and R=W=0: it needs no response and is no fault.

Upstream Linux virtio-iommu guests can only log a fault, not answer it, so the backend
answers on their behalf with the policy the user picks:

- ``invalid``: relay each request as a fault record (the guest prints its line), then answer
  Invalid Request: the access fails, as a device without a resolver would see.
- ``host``: announce the group (QMP event PAGE_REQUEST, query-page-requests) and wait for the
  controller, which may populate the mapping and answer Success (`page-response`).
- ``guest``: for guests that negotiated VIOMMU_F_PAGE_REQUEST: relay extended fault records
  (PASID, group ID) and wait for the guest's PAGE_RESP.

A group nobody answers in time is answered Invalid Request. Stop Markers need no answer and
are no fault: counted, never relayed. Unbinding a PASID drains its requests first, so no
stale fault reaches the next address space on that PASID: with stop markers a PRI queue
holds stale faults, a stop marker, then faults of the next address space (linux-kernel,
"[RFC PATCHES 00/17] IOMMUFD: Deliver IO page faults to user space", June 2023).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from viommu.device.observers import DeviceObserver
from viommu.uapi import PageRespCode

if TYPE_CHECKING:
    from viommu.events.relay import EventRelay

log = logging.getLogger(__name__)


class ResponseCode(enum.IntEnum):
    """PRG Response Code, as on the wire (PCIe; Intel QI_RESP_*, AMD PPR_*)."""

    SUCCESS = 0x0  # pages made resident: the function retries
    INVALID_REQUEST = 0x1  # cannot be satisfied: the access fails, no retry
    RESPONSE_FAILURE = 0xF  # catastrophic: the function disables its PRI


PRG_INDEX_BITS = 9
PASID_BITS = 20


@dataclasses.dataclass(frozen=True)
class PageRequest:
    sid: int  # requester = virtio-iommu endpoint ID
    grpid: int  # Page Request Group Index
    address: int  # page address (bits 63:12)
    last: bool  # L: last request of the group
    read: bool
    write: bool
    exec: bool = False  # PASID Execute Requested
    priv: bool = False  # PASID Privileged Mode Requested
    pasid: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.grpid < 1 << PRG_INDEX_BITS:
            raise ValueError(f"group index {self.grpid} does not fit {PRG_INDEX_BITS} bits")
        if self.pasid is not None and not 0 <= self.pasid < 1 << PASID_BITS:
            raise ValueError(f"PASID {self.pasid} does not fit {PASID_BITS} bits")
        if self.address & 0xFFF or not 0 <= self.address < 1 << 64:
            raise ValueError(f"page address {self.address:#x} is not a 4 KiB page address")

    @property
    def is_stop_marker(self) -> bool:
        return self.last and not self.read and not self.write

    @property
    def group_key(self) -> tuple[int, int | None, int]:
        """Requests of one group share requester, PASID and group index."""
        return self.sid, self.pasid, self.grpid

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


POLICIES = ("invalid", "host", "guest")
Responder = Callable[[ResponseCode], None]
GroupKey = tuple[int, int | None, int]
# PAGE_RESP codes (the guest's answer) as PRG Response Codes.
_RESPONSE_OF_PAGE_RESP = {
    PageRespCode.SUCCESS: ResponseCode.SUCCESS,
    PageRespCode.INVALID: ResponseCode.INVALID_REQUEST,
    PageRespCode.FAILURE: ResponseCode.RESPONSE_FAILURE,
}


class Announcer(Protocol):
    """Who tells the controller about groups waiting for it (the control server)."""

    def emit(self, event: str, data: dict) -> None: ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """What runs a callback later (an asyncio loop does)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...


@dataclasses.dataclass
class PendingGroup:
    group_id: int
    requests: list[PageRequest]
    respond: Responder
    policy: str
    created: float
    timer: TimerHandle | None = None

    @property
    def key(self) -> GroupKey:
        return self.requests[-1].group_key

    def to_dict(self) -> dict:
        sid, pasid, grpid = self.key
        return {"id": self.group_id, "sid": sid, "pasid": pasid, "grpid": grpid,
                "policy": self.policy, "age": time.time() - self.created,
                "requests": [r.to_dict() for r in self.requests]}


class PageRequestRelay(DeviceObserver):
    """Page request groups, from whatever source, to their one answer. It follows the
    device (a PASID unbound drains its groups) and takes the guest's PAGE_RESP answers."""

    def __init__(self, events: EventRelay, announcer: Announcer, timers: Timers,
                 policy: str = "invalid", timeout: float = 10.0, max_groups: int = 256) -> None:
        self.events = events
        self.announcer = announcer
        self.timers = timers
        self.policy = policy
        self.timeout = timeout
        self.max_groups = max_groups
        self.guest_can_answer = False
        self._partial: dict[GroupKey, tuple[list[PageRequest], Responder]] = {}
        self.pending: dict[int, PendingGroup] = {}
        self._ids = itertools.count(1)
        self.requests = 0
        self.groups = 0
        self.stop_markers = 0
        self.overflows = 0
        self.timeouts = 0
        self.drained_groups = 0
        self.responses: Counter[str] = Counter()

    def set_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.policy = policy

    # --- requests in ----------------------------------------------------------------------

    def submit(self, request: PageRequest, respond: Responder) -> None:
        """One request; the group is handled when its last request arrives. `respond`
        (given with the last request) is called once with the group's response."""
        if request.is_stop_marker:
            self.stop_markers += 1
            log.info("stop marker sid=%#x pasid=%s grpid=%d: no response, no fault",
                     request.sid, request.pasid, request.grpid)
            return
        self.requests += 1
        collected, _ = self._partial.get(request.group_key, ([], respond))
        collected.append(request)
        if not request.last:
            self._partial[request.group_key] = (collected, respond)
            return
        self._partial.pop(request.group_key, None)
        self._group_complete(collected, respond)

    def _group_complete(self, requests: list[PageRequest], respond: Responder) -> None:
        self.groups += 1
        policy = self.policy
        if policy == "guest" and not self.guest_can_answer:
            log.warning("policy 'guest' but the driver did not negotiate "
                        "VIOMMU_F_PAGE_REQUEST: answering Invalid Request after relaying")
            policy = "invalid"
        if policy != "invalid" and len(self.pending) >= self.max_groups:
            self.overflows += 1
            policy = "invalid"  # bounded: answered at once rather than queued
        if policy in ("invalid", "guest"):
            for request in requests:
                self.events.submit_page_request(request)
        if policy == "invalid":
            self._answer(respond, ResponseCode.INVALID_REQUEST, requests[-1].group_key, policy)
            return
        group = PendingGroup(next(self._ids), requests, respond, policy, time.time())
        group.timer = self.timers.call_later(self.timeout,
                                             lambda: self._expire(group.group_id))
        self.pending[group.group_id] = group
        if policy == "host":
            self.announcer.emit("PAGE_REQUEST", group.to_dict())

    # --- responses out --------------------------------------------------------------------

    def respond(self, group_id: int, code: ResponseCode, source: str) -> None:
        group = self.pending.pop(group_id, None)
        if group is None:
            raise KeyError(f"no page request group {group_id} is waiting for a response")
        if group.timer is not None:
            group.timer.cancel()
        self._answer(group.respond, code, group.key, source)

    def guest_response(self, endpoint_id: int, pasid: int | None, grpid: int,
                       code: PageRespCode) -> bool:
        """The guest's PAGE_RESP for a group it received as extended fault records."""
        group_id = self.find(endpoint_id, pasid, grpid)
        if group_id is None:
            return False
        self.respond(group_id, _RESPONSE_OF_PAGE_RESP[code], "guest")
        return True

    def find(self, sid: int, pasid: int | None, grpid: int) -> int | None:
        """The pending group a PAGE_RESP names."""
        for group_id, group in self.pending.items():
            if group.key == (sid, pasid, grpid):
                return group_id
        return None

    def _expire(self, group_id: int) -> None:
        if group_id in self.pending:
            self.timeouts += 1
            log.warning("page request group %d unanswered after %g s: Invalid Request",
                        group_id, self.timeout)
            self.respond(group_id, ResponseCode.INVALID_REQUEST, "timeout")

    def _answer(self, respond: Responder, code: ResponseCode, key: GroupKey,
                source: str) -> None:
        self.responses[code.name] += 1
        log.info("page response sid=%#x pasid=%s grpid=%d: %s (%s)", *key, code.name, source)
        respond(code)

    # --- PASID lifecycle ----------------------------------------------------------------

    def pasid_unbound(self, endpoint_id: int, pasid: int | None) -> None:
        self.drain(endpoint_id, pasid)

    def drain(self, sid: int, pasid: int | None = None) -> int:
        """Before a PASID (None: every PASID of the stream) is reused: answer its waiting
        groups Invalid Request, forget its partial groups, and drop its undelivered fault
        records, so nothing stale reaches the next address space. Returns groups answered."""
        matches = [g for g in self.pending.values()
                   if g.key[0] == sid and (pasid is None or g.key[1] == pasid)]
        for group in matches:
            self.drained_groups += 1
            self.respond(group.group_id, ResponseCode.INVALID_REQUEST, "drained")
        for key in [k for k in self._partial if k[0] == sid and (pasid is None or k[1] == pasid)]:
            # No last request seen: no response is owed; the requests are simply stale.
            self._partial.pop(key)
            self.drained_groups += 1
            log.info("dropped the partial group sid=%#x pasid=%s grpid=%d (unbound)", *key)
        self.events.drain(sid, pasid, f"PASID {pasid} of sid {sid:#x} unbound")
        return len(matches)

    def counters(self) -> dict:
        return {"requests": self.requests, "groups": self.groups,
                "stop_markers": self.stop_markers, "pending_groups": len(self.pending),
                "responses": dict(self.responses), "timeouts": self.timeouts,
                "overflows": self.overflows, "drained_groups": self.drained_groups,
                "policy": self.policy}
