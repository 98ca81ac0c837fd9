"""Page request groups: collected, relayed to the guest, and answered exactly once.

Upstream Linux virtio-iommu guests can only log a fault, not answer it, so the backend
answers on their behalf with the policy the user picks:

- ``invalid``: relay each request as a fault record (the guest prints its line), then answer
  Invalid Request: the access fails, as a device without a resolver would see.
- ``host``: announce the group (QMP event PAGE_REQUEST, query-page-requests) and wait for the
  controller, which may populate the mapping and answer Success (`page-response`).
- ``guest``: for guests that negotiated VIOMMU_F_PAGE_REQUEST: relay extended fault records
  (PASID, group ID) and wait for the guest's PAGE_RESP.

A group nobody answers in time is answered Invalid Request. Stop Markers need no answer and
are no fault: counted, never relayed. Unbinding a PASID drains its requests first (seed 004:
stale faults, then a stop marker, then faults of the next address space on that PASID).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable

from viommu.events.pri import PageRequest, ResponseCode
from viommu.events.relay import EventRelay

log = logging.getLogger(__name__)

POLICIES = ("invalid", "host", "guest")
Responder = Callable[[ResponseCode], None]
GroupKey = tuple[int, int | None, int]


@dataclasses.dataclass
class PendingGroup:
    group_id: int
    requests: list[PageRequest]
    respond: Responder
    policy: str
    created: float
    cancel_timeout: Callable[[], None] = lambda: None

    @property
    def key(self) -> GroupKey:
        return self.requests[-1].group_key

    def to_dict(self) -> dict:
        sid, pasid, grpid = self.key
        return {"id": self.group_id, "sid": sid, "pasid": pasid, "grpid": grpid,
                "policy": self.policy, "age": time.time() - self.created,
                "requests": [r.to_dict() for r in self.requests]}


class PageRequestRelay:
    def __init__(self, events: EventRelay, flush_events: Callable[[], object],
                 emit: Callable[[str, dict], None],
                 schedule: Callable[[float, Callable[[], None]], Callable[[], None]],
                 policy: str = "invalid", timeout: float = 10.0, max_groups: int = 256) -> None:
        self.events = events
        self.flush_events = flush_events
        self.emit = emit
        self.schedule = schedule  # (delay, fn) -> cancel
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
            self.flush_events()
        if policy == "invalid":
            self._answer(respond, ResponseCode.INVALID_REQUEST, requests[-1].group_key, policy)
            return
        group = PendingGroup(next(self._ids), requests, respond, policy, time.time())
        group.cancel_timeout = self.schedule(self.timeout, lambda: self._expire(group.group_id))
        self.pending[group.group_id] = group
        if policy == "host":
            self.emit("PAGE_REQUEST", group.to_dict())

    # --- responses out --------------------------------------------------------------------

    def respond(self, group_id: int, code: ResponseCode, source: str) -> None:
        group = self.pending.pop(group_id, None)
        if group is None:
            raise KeyError(f"no page request group {group_id} is waiting for a response")
        group.cancel_timeout()
        self._answer(group.respond, code, group.key, source)

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
