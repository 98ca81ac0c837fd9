"""inject-event and query-events: SMMUv3 event records into the relay, and its accounting.

An injected event runs as a straight line: `inject_event` parses the arguments into an
SMMUv3 record (viommu.events.smmuv3), the relay converts it to a fault record
(viommu.events.faults) and pushes it into the guest's eventq (viommu.dataplane.eventq),
which notifies the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from viommu.backend.commands.traces import TRACE_ARGS, trace_slice
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.events.page_requests import PageRequestRelay
from viommu.events.relay import EventRelay
from viommu.events.smmuv3 import (
    ADDRESS_EVENTS,
    FETCH_EVENTS,
    EventClass,
    EventId,
    EventRecord,
    PageHint,
    is_config_event,
)
from viommu.transport.control import Arg, Command, CommandError, ControlServer

MAX_INJECT_COUNT = 1_000_000
ACCESSES = ("read", "write", "exec")
# inject-event arguments that only events with an input address carry
ACCESS_ARGS = frozenset({"address", "access", "privileged", "s2", "ipa", "class", "stall",
                         "stag"})
# what an E_PAGE_REQUEST (a page request hint) carries: a page address, the access it
# anticipates and the privilege, and how many pages the hint spans
PAGE_HINT_ARGS = frozenset({"address", "access", "privileged", "span"})
# access (privileged?) -> the E_PAGE_REQUEST flag: pR, uR, pW, uW, pX, uX
PAGE_HINTS = {("read", True): PageHint.PR, ("read", False): PageHint.UR,
              ("write", True): PageHint.PW, ("write", False): PageHint.UW,
              ("exec", True): PageHint.PX, ("exec", False): PageHint.UX}


def access_arg(args: dict[str, Any]) -> str:
    access = args.get("access", "read")
    if access not in ACCESSES:
        raise CommandError(f"access must be read, write or exec, not {access!r}")
    return access


class EventCommands:
    def __init__(self, device: VirtioIommuDevice, relay: EventRelay,
                 page_requests: PageRequestRelay,
                 guest_absence: Callable[[int], str | None] | None = None) -> None:
        """`guest_absence(sid)`: why the guest does not have that endpoint, or None."""
        self.device = device
        self.relay = relay
        self.page_requests = page_requests
        self.guest_absence = guest_absence or self.device.guest_absence
        self.control: ControlServer | None = None

    def register(self, control: ControlServer) -> None:
        self.control = control  # when the command being served arrived
        control.register(Command("inject-event", self.inject_event, (
            Arg("type", (str, int), True, "SMMUv3 event name (C_BAD_STE) or ID"),
            Arg("sid", (int,), True, "StreamID = virtio-iommu endpoint ID"),
            Arg("ssid", (int,), help="SubstreamID (PASID); sets SSV"),
            Arg("address", (int,), help="InputAddr of the faulting access"),
            Arg("access", (str,), help="read (default), write or exec"),
            Arg("privileged", (bool,)),
            Arg("s2", (bool,), help="the fault is in stage 2"),
            Arg("ipa", (int,), help="IPA of a stage-2 fault"),
            Arg("fetch-addr", (int,), help="FetchAddr of a fetch fault"),
            Arg("class", (str,), help="CD, TT or IN (default)"),
            Arg("stall", (bool,)), Arg("stag", (int,)),
            Arg("span", (int,), help="E_PAGE_REQUEST: pages the hint spans (default 1)"),
            Arg("count", (int,), help="inject this many copies (a burst)"),
            Arg("force", (bool,), help="deliver even for an endpoint the guest does not have"),
        ), "Inject SMMUv3 event records for a stream; they reach the guest as fault records"))
        control.register(Command("query-events", self.query_events, TRACE_ARGS,
                                 help="Event counters and trace"))

    def inject_event(self, args: dict[str, Any]) -> dict:
        try:
            event_id = EventId.parse(args["type"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        sid = args["sid"]
        if sid not in self.device.endpoints:
            known = ", ".join(f"{e:#x}" for e in sorted(self.device.endpoints))
            raise CommandError(f"sid {sid:#x} is not an endpoint of this vIOMMU "
                               f"(known: {known or 'none'})")
        count = args.get("count", 1)
        if not 1 <= count <= MAX_INJECT_COUNT:
            raise CommandError(f"count must be 1..{MAX_INJECT_COUNT}, got {count}")
        record = record_from_args(event_id, sid, args)
        absent = self.guest_absence(sid)
        if absent and not args.get("force", False):
            raise CommandError(f"{absent}; force=true delivers it anyway (viommu inject "
                               "--force)")
        if is_config_event(event_id):
            self.device.note_config_fault(sid, event_id.name)
        relay = self.relay
        lost, not_forwarded = relay.lost, relay.not_forwarded
        arrived_ns = self.control.arrival_ns if self.control else 0
        first = relay.submit_burst(record, count, arrived_ns)[0]
        if absent:
            relay.to_absent_endpoints += count
        # The FIFO is delivered in order, so this burst's records are the last ones pending.
        pending = min(relay.pending, count)
        lost = relay.lost - lost
        not_forwarded = relay.not_forwarded - not_forwarded
        notes = [note for note in (first.note, absent and f"delivered as asked, but {absent}")
                 if note]
        return {"seq": first.seq, "count": count, "pending": pending, "lost": lost,
                "not_forwarded": not_forwarded,
                "delivered": count - pending - lost - not_forwarded,
                "guest_line": first.fault.guest_line() if first.fault else None,
                "note": "; ".join(notes) or None}

    def query_events(self, args: dict) -> dict:
        counters = self.relay.counters()  # first: brings the trace states up to date
        trace = trace_slice(self.relay.trace, lambda e: e.seq, args)
        return {**counters, "page_requests": self.page_requests.counters(),
                # command arrival -> record in the used ring and the driver notified
                "delivery_us": self.relay.delivery_latency(),
                "trace": [e.to_dict() for e in trace]}


def record_from_args(event_id: EventId, sid: int, args: dict[str, Any]) -> EventRecord:
    """The SMMUv3 record; fields the architecture does not give this event type are refused."""
    allowed = {"type", "sid", "ssid", "count", "force"}
    if event_id in ADDRESS_EVENTS:
        allowed |= ACCESS_ARGS
    if event_id in FETCH_EVENTS:
        allowed.add("fetch-addr")
    if event_id == EventId.E_PAGE_REQUEST:
        allowed |= PAGE_HINT_ARGS
    extra = sorted(set(args) - allowed)
    if extra:
        raise CommandError(f"{event_id.name} records carry no {', '.join(extra)}")
    access = access_arg(args)
    if event_id == EventId.E_PAGE_REQUEST:
        return page_hint_record(sid, access, args)
    class_name = args.get("class", "IN" if event_id in ADDRESS_EVENTS else "CD").upper()
    if class_name not in EventClass.__members__:
        raise CommandError(f"class must be CD, TT or IN, not {args['class']!r}")
    try:
        return EventRecord(
            event_id=event_id, sid=sid, ssid=args.get("ssid", 0), ssv="ssid" in args,
            address=args.get("address", 0),
            rnw=event_id in ADDRESS_EVENTS and access != "write", ind=access == "exec",
            pnu=args.get("privileged", False), s2=args.get("s2", False),
            ipa=args.get("ipa", 0), fetch_addr=args.get("fetch-addr", 0),
            event_class=EventClass[class_name], stall=args.get("stall", False),
            stag=args.get("stag", 0))
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def page_hint_record(sid: int, access: str, args: dict[str, Any]) -> EventRecord:
    """An E_PAGE_REQUEST: the page at `address`, `span` pages, the access anticipated (one
    of pR/pW/pX/uR/uW/uX, by `access` and `privileged`)."""
    span = args.get("span", 1)
    if not 1 <= span <= 0xFF:
        raise CommandError(f"span is 1..255 pages (the record's Span field), got {span}")
    try:
        return EventRecord(
            event_id=EventId.E_PAGE_REQUEST, sid=sid, ssid=args.get("ssid", 0),
            ssv="ssid" in args, address=args.get("address", 0), span=span,
            page_hints=PAGE_HINTS[access, args.get("privileged", False)])
    except ValueError as exc:
        raise CommandError(str(exc)) from None
