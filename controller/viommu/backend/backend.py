"""The viommu backend process: a virtio-iommu served over vhost-user, plus its control server.

One asyncio loop runs the control plane (vhost-user messages, eventq, control commands) and
every device decision. The requestq has a thread of its own (viommu.dataplane.requestq) that serves
MAP/UNMAP without the GIL and hands the rest to the loop; the loop holds the data-plane
lock outside its waits, so loop code never races it. `Backend.run()` runs the loop (as
`viommu backend` does); `Backend.start_in_thread()` runs it inside the controller's process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from viommu import __version__
from viommu._dataplane import DataplaneLock, GuestMemory, RingError, VirtQueue
from viommu.dataplane.requestq import DEFAULT_POLL_US, RequestService, dataplane_event_loop
from viommu.dataplane.translation import PriState, Translator
from viommu.device.virtio_iommu import DeviceConfig, ResourceLimit, VirtioIommuDevice
from viommu.endpoints.dma_engine import DmaEndpoint
from viommu.events.page_requests import PageRequestRelay
from viommu.events.pri import PageRequest, ResponseCode
from viommu.events.relay import EventRelay
from viommu.events.smmuv3 import (
    ADDRESS_EVENTS,
    CONFIG_EVENTS,
    FETCH_EVENTS,
    EventClass,
    EventId,
    EventRecord,
)
from viommu.transport.control import Arg, Command, CommandError, ControlServer
from viommu.transport.iommufd import FaultGroup, FaultQueue, PriMustBeDisabled, VeventQueue
from viommu.transport.sockets import listen_private_unix, unlink_quietly
from viommu.transport.vfio_user.server import EndpointServer
from viommu.transport.vhost_user.connection import VhostUserConnection
from viommu.transport.vhost_user.messages import ProtocolFeature
from viommu.uapi import VHOST_USER_F_PROTOCOL_FEATURES, VIOMMU_F_PAGE_REQUEST, PageRespCode

log = logging.getLogger(__name__)

REQUESTQ = 0
EVENTQ = 1
MAX_INJECT_COUNT = 1_000_000
MAX_MEMORY_ACCESS = 1 << 20
MAX_REQUESTER_ID = 0xFFFF  # bus:device.function
# inject-event arguments that only events with an input address carry
ACCESS_ARGS = frozenset({"address", "access", "privileged", "s2", "ipa", "class", "stall",
                         "stag"})


class Backend:
    """A virtio-iommu vhost-user back-end for one VM."""

    num_queues = 2

    def __init__(self, socket_path: str, control_path: str | None, endpoints: Iterable[int],
                 config: DeviceConfig | None = None, event_capacity: int = 1024,
                 exit_on_disconnect: bool = True, page_request_policy: str = "invalid",
                 request_thread: bool = True, poll_us: float = DEFAULT_POLL_US,
                 listen_fds: tuple[int, int | None] | None = None) -> None:
        """`request_thread`: serve the requestq on its own thread (viommu.dataplane.requestq) when
        the loop is `run()`'s; else on the loop, in Python. `poll_us`: that thread's
        busy-poll window after a request. `listen_fds`: the vhost-user and control sockets,
        already bound at the two paths and listening (the launcher made them, so QEMU
        could start without waiting for this process)."""
        self.socket_path = socket_path
        self.listen_fds = listen_fds
        self.control_path = control_path
        self.device = VirtioIommuDevice(endpoints, config)
        self.relay = EventRelay(capacity=event_capacity)
        self.translator = Translator(self.device, self._submit_dma_event)
        self.endpoint_servers: dict[int, EndpointServer] = {}
        self.exit_on_disconnect = exit_on_disconnect
        self.control = ControlServer("viommu " + __version__, _version_tuple())
        self.pri: dict[int, PriState] = {}
        self.page_requests = PageRequestRelay(self.relay, self._flush_events, self.control.emit,
                                              self._schedule, policy=page_request_policy)
        self.device.on_pasid_unbind.append(self.page_requests.drain)
        self.device.on_page_response = self._guest_page_response
        self.host_queues: list[FaultQueue | VeventQueue] = []
        self._register_commands()
        self.connection: VhostUserConnection | None = None
        # index -> (ring, used-buffer notifier, vring-error signaller)
        self.queues: dict[int, tuple[VirtQueue, Callable[[], None], Callable[[], bool]]] = {}
        self.resets = 0
        self.broken: str | None = None
        self.lock = DataplaneLock()
        self.request_thread = request_thread
        self.poll_us = poll_us
        self.requestq: RequestService | None = None
        self._loop_holds_lock = False  # run() made the loop: the request thread may run
        self.loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Listen on both sockets and serve until `stop()` (or the front-end leaves)."""
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._listen_vhost_user()
        if self.control_path:
            control_fd = self.listen_fds[1] if self.listen_fds else None
            await self.control.listen_unix(self.control_path, control_fd)
        await self._stopped.wait()
        await self.control.close()
        for server in self.endpoint_servers.values():
            server.close()
        if self.connection is not None:
            self.connection.close()
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            unlink_quietly(self.socket_path)
        if self.control_path:
            unlink_quietly(self.control_path)

    def stop(self) -> None:
        """Ask the loop to finish; harmless when it already has (the VM left first)."""
        if self.loop is not None and self._stopped is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._stopped.set)
            except RuntimeError:  # closed between the check and the call
                pass

    def run(self) -> None:
        """Serve on a new event loop in this thread until `stop()`."""
        self._run(self.serve())

    def _run(self, main: Coroutine[Any, Any, None]) -> None:
        self._loop_holds_lock = True
        with asyncio.Runner(loop_factory=lambda: dataplane_event_loop(self.lock)) as runner:
            runner.run(main)

    def start_in_thread(self) -> None:
        """Run the backend inside this process; returns once both sockets listen."""
        ready = threading.Event()

        async def main() -> None:
            task = asyncio.ensure_future(self.serve())
            while self._stopped is None or (self.control_path and self.control._server is None):
                await asyncio.sleep(0.01)
            ready.set()
            await task

        self._thread = threading.Thread(target=self._run, args=(main(),),
                                        name="viommu-backend", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the in-process backend did not start listening within 10 s")

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _listen_vhost_user(self) -> None:
        if self.listen_fds is not None:
            self._listener = socket.socket(fileno=self.listen_fds[0])
            self._listener.setblocking(False)
        else:
            self._listener = listen_private_unix(self.socket_path)
        self.loop.add_reader(self._listener.fileno(), self._accept)
        log.info("vhost-user: listening on %s", self.socket_path)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self.connection is not None and not self.connection.closed:
            log.error("vhost-user: refusing a second front-end; one VM per backend")
            sock.close()
            return
        sock.setblocking(True)
        log.info("vhost-user: front-end connected")
        if self.connection is not None:
            self.reset("a new front-end connected")  # another VM: nothing carries over
        self.connection = VhostUserConnection(sock, self, self.loop.add_reader,
                                              self._remove_reader)
        self.loop.add_reader(sock.fileno(), self._on_vhost_user_readable)

    def _on_vhost_user_readable(self) -> None:
        conn = self.connection
        conn.on_readable()
        if conn.closed:
            self.queues.clear()
            self.control.emit("FRONTEND_DISCONNECTED", {})
            if self.exit_on_disconnect:
                log.warning("vhost-user: the VM is gone; backend exits")
                self._stopped.set()

    def _remove_reader(self, fd: int) -> None:
        self.loop.remove_reader(fd)

    # --- VhostUserDevice ----------------------------------------------------------------------

    def features(self) -> int:
        return VirtioIommuDevice.OFFERED_FEATURES | (1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def protocol_features(self) -> int:
        return (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)

    def set_acked_features(self, features: int) -> None:
        self.device.driver_features = features & VirtioIommuDevice.OFFERED_FEATURES
        answers = self.device.negotiated(VIOMMU_F_PAGE_REQUEST)
        self.relay.extended = answers  # 32-byte records with PASID and group ID
        self.page_requests.guest_can_answer = answers
        if self.requestq is not None:
            self.requestq.configure()

    def get_config(self) -> bytes:
        return self.device.config_bytes()

    def set_config(self, offset: int, data: bytes) -> None:
        self.device.write_config(offset, data)

    def memory_changed(self, mem: GuestMemory) -> None:
        self.translator.memory_changed(mem)

    def queue_started(self, index: int, vq: VirtQueue, notify: Callable[[], None],
                      signal_error: Callable[[], bool], kick_fd: int) -> bool:
        self.queues[index] = (vq, notify, signal_error)
        threaded = index == REQUESTQ and self.request_thread and self._loop_holds_lock
        log.info("queue %d started (size %d%s)", index, vq.num,
                 ", served by the request thread" if threaded else "")
        if threaded:
            self.requestq = RequestService(self.device, self.lock, vq, kick_fd,
                                           self._serve_requests, notify, self.loop.add_reader,
                                           self.loop.remove_reader, self.poll_us)
            self.requestq.pause(bool(self.broken))
        return threaded

    def queue_stopped(self, index: int) -> None:
        if index == REQUESTQ and self.requestq is not None:
            self.requestq.stop()
            self.requestq = None
        self.queues.pop(index, None)
        log.info("queue %d stopped", index)

    def queue_kicked(self, index: int) -> None:
        if index == REQUESTQ:
            self._serve_requests()
        elif index == EVENTQ:
            self._flush_events()

    def reset(self, reason: str) -> None:
        self.resets += 1
        self.broken = None
        if self.requestq is not None:
            self.requestq.pause(False)
        for sid in {g.key[0] for g in self.page_requests.pending.values()}:
            self.page_requests.drain(sid)  # nobody is left to answer them
        lost = self.relay.drop_pending(f"dropped by device reset: {reason}")
        self.device.reset()
        log.warning("device reset: %s (%d pending events counted lost)", reason, lost)
        self.control.emit("DEVICE_RESET", {"reason": reason, "lost_events": lost})

    # --- data plane -----------------------------------------------------------------------------

    def _serve_requests(self) -> None:
        entry = self.queues.get(REQUESTQ)
        if entry is None or self.broken:
            return
        vq, notify, signal_error = entry
        try:
            used = vq.process_requests(self.device.handle_request)
        except RingError as exc:
            self._mark_broken(str(exc), signal_error)
            return
        if used and vq.needs_interrupt():
            notify()

    def _flush_events(self) -> int:
        entry = self.queues.get(EVENTQ)
        if entry is None or self.broken:
            return 0
        vq, notify, signal_error = entry
        try:
            delivered = self.relay.flush(vq.push_event)
        except RingError as exc:
            self._mark_broken(str(exc), signal_error)
            return 0
        if delivered and vq.needs_interrupt():
            notify()
        return delivered

    # --- the iommufd host edge ----------------------------------------------------------------

    def attach_iommufd(self, fault_fd: int | None, veventq_fd: int | None,
                       dev_to_sid: dict[int, int],
                       add_reader: Callable[[int, Callable[[], object]], None] | None = None
                       ) -> list[FaultQueue | VeventQueue]:
        """Take a real host's IO page faults (iommufd fault fd) and SMMUv3 events (vEVENTQ fd)
        for our endpoints; viommu.transport.iommufd's docstring says how a VMM gets those fds.
        `dev_to_sid` maps iommufd device IDs to endpoint IDs (vDEVICE virt_id = endpoint)."""
        add_reader = add_reader or self.loop.add_reader
        queues: list[FaultQueue | VeventQueue] = []
        if fault_fd is not None:
            fault_queue = FaultQueue(fault_fd, dev_to_sid)
            fault_queue.on_group = lambda group: self._host_fault_group(fault_queue, group)
            queues.append(fault_queue)
        if veventq_fd is not None:
            queues.append(VeventQueue(veventq_fd, self._host_event, self._host_events_lost))
        for queue in queues:
            add_reader(queue.fileno(), queue.on_readable)
        self.host_queues += queues
        return queues

    def _host_fault_group(self, queue: FaultQueue, group: FaultGroup) -> None:
        def respond(code: ResponseCode) -> None:
            try:
                queue.respond(group.cookie, code)
            except PriMustBeDisabled as exc:
                log.warning("%s", exc)
                self.control.emit("PRI_DISABLE_NEEDED", {"sid": group.sid, "cookie": group.cookie})

        for request in group.requests:
            self.page_requests.submit(request, respond)

    def _host_event(self, event: EventRecord) -> None:
        self.relay.submit(event)
        self._flush_events()

    def _host_events_lost(self, count: int) -> None:
        self.relay.note_upstream_lost(count, "the host's vEVENTQ overflowed")
        self.control.emit("EVENTS_LOST", {"count": count, "where": "host vEVENTQ"})

    def _schedule(self, delay: float, fn: Callable[[], None]) -> Callable[[], None]:
        if self.loop is None:
            return lambda: None
        return self.loop.call_later(delay, fn).cancel

    def _guest_page_response(self, sid: int, pasid: int | None, grpid: int,
                             code: PageRespCode) -> bool:
        group_id = self.page_requests.find(sid, pasid, grpid)
        if group_id is None:
            return False
        self.page_requests.respond(group_id, _RESPONSE_OF_PAGE_RESP[code], "guest")
        return True

    def _submit_dma_event(self, event: EventRecord) -> None:
        """A fault raised by an endpoint's real DMA: relayed like an injected event."""
        self.relay.submit(event)
        if event.event_id in CONFIG_EVENTS and event.sid in self.device.endpoints:
            self.device.endpoints[event.sid].config_fault = EventId(event.event_id).name
        self._flush_events()

    def _mark_broken(self, why: str, signal_error: Callable[[], bool]) -> None:
        # The driver corrupted a ring: stop serving it rather than guess. The next guest
        # reset restarts the rings and clears this.
        self.broken = why
        if self.requestq is not None:
            self.requestq.pause()
        signalled = signal_error()
        log.error("device broken until the guest resets it: %s (vring error fd %s)", why,
                  "signalled" if signalled else "absent")
        self.control.emit("DEVICE_BROKEN", {"reason": why, "vring_error_signalled": signalled})

    # --- control commands -------------------------------------------------------------------------

    def _register_commands(self) -> None:
        c = self.control
        c.register(Command("inject-event", self._cmd_inject_event, (
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
            Arg("count", (int,), help="inject this many copies (a burst)"),
        ), "Inject SMMUv3 event records for a stream; they reach the guest as fault records"))
        c.register(Command("query-endpoints", self._cmd_query_endpoints,
                           help="Endpoints, their domains and modes"))
        c.register(Command("query-domains", self._cmd_query_domains,
                           help="Domains with their endpoints and mappings"))
        c.register(Command("query-events", self._cmd_query_events, _TRACE_ARGS,
                           help="Event counters and trace"))
        c.register(Command("query-requests", self._cmd_query_requests, _TRACE_ARGS,
                           help="Request counters and trace"))
        c.register(Command("query-translations", self._cmd_query_translations, _TRACE_ARGS,
                           help="Endpoints' DMA translations (one entry a transfer)"))
        c.register(Command("query-status", self._cmd_query_status,
                           help="Front-end connection, queues, features, resets"))
        c.register(Command("add-endpoint", self._cmd_add_endpoint,
                           (Arg("endpoint", (int,), True, "endpoint ID (= PCI requester ID)"),),
                           help="Declare an endpoint behind this vIOMMU (before hot-plug)"))
        c.register(Command("memory-read", self._cmd_memory_read, (
            Arg("gpa", (int,), True), Arg("size", (int,), True)),
            help="Read guest-physical memory (hex)"))
        c.register(Command("memory-write", self._cmd_memory_write, (
            Arg("gpa", (int,), True), Arg("data", (str,), True, "hex bytes")),
            help="Write guest-physical memory, e.g. page tables in the reserved range"))
        c.register(Command("endpoint-create", self._cmd_endpoint_create, (
            Arg("endpoint", (int,), True, "endpoint ID (= PCI requester ID it will have)"),
            Arg("socket", (str,), help="vfio-user socket path (default: beside control)"),
            Arg("pri", (bool,), help="PCIe PRI: ask for non-present pages (page requests)")),
            help="Serve a DMA endpoint over vfio-user; every DMA goes through translation"))
        c.register(Command("endpoint-delete", self._cmd_endpoint_delete, (
            Arg("endpoint", (int,), True),), help="Stop serving a DMA endpoint"))
        c.register(Command("attach-table", self._cmd_attach_table, (
            Arg("sid", (int,), True), Arg("ste0", (int,), True, "STE dword 0"),
            Arg("ste1", (int,), help="STE dword 1 (default 0)")),
            help="Bind a stream to SMMUv3 tables in guest memory (page-table mode)"))
        c.register(Command("stage2-set", self._cmd_stage2_set, (
            Arg("ipa", (int,), True), Arg("size", (int,), True),
            Arg("access", (str,), True, "rw, ro or none")),
            help="Host stage 2: revoke (none) or write-protect (ro) guest RAM for DMA"))
        c.register(Command("stage2-reset", self._cmd_stage2_reset,
                           help="Host stage 2: every guest RAM page read-write again"))
        c.register(Command("inject-page-request", self._cmd_inject_page_request, (
            Arg("sid", (int,), True), Arg("address", (int,), True, "page address"),
            Arg("grpid", (int,), help="Page Request Group Index (default 0)"),
            Arg("pasid", (int,)), Arg("access", (str,), help="read (default), write or exec"),
            Arg("privileged", (bool,)), Arg("last", (bool,), help="last of its group (default)"),
            Arg("stop-marker", (bool,), help="a Stop Marker: L=1, no access, no response")),
            help="Inject a PCIe page request as an endpoint would issue it"))
        c.register(Command("page-response", self._cmd_page_response, (
            Arg("id", (int,), True, "group id from PAGE_REQUEST / query-page-requests"),
            Arg("code", (str,), True, "success, invalid or failure")),
            help="Answer a page request group (policy host)"))
        c.register(Command("set-page-request-policy", self._cmd_set_policy, (
            Arg("policy", (str,), True, "invalid, host or guest"),),
            help="How page request groups are answered"))
        c.register(Command("query-page-requests", self._cmd_query_page_requests,
                           help="Page request counters and the groups waiting for an answer"))
        c.register(Command("pasid-unbind", self._cmd_pasid_unbind, (
            Arg("sid", (int,), True), Arg("pasid", (int,), help="default: every PASID")),
            help="Unbind a PASID: drain its page requests before it is reused"))
        c.register(Command("quit", self._cmd_quit, help="Stop the backend"))

    def _cmd_inject_event(self, args: dict[str, Any]) -> dict:
        try:
            event_id = EventId.parse(args["type"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        sid = args["sid"]
        if sid not in self.device.endpoints:
            known = ", ".join(str(e) for e in sorted(self.device.endpoints))
            raise CommandError(f"sid {sid} is not an endpoint of this vIOMMU (known: {known})")
        count = args.get("count", 1)
        if not 1 <= count <= MAX_INJECT_COUNT:
            raise CommandError(f"count must be 1..{MAX_INJECT_COUNT}, got {count}")
        record = self._event_from_args(event_id, sid, args)
        before = self.relay.counters()
        first = self.relay.submit_burst(record, count)[0]
        if event_id in CONFIG_EVENTS:
            self.device.endpoints[sid].config_fault = event_id.name
        self._flush_events()
        after = self.relay.counters()
        # The FIFO was flushed in order, so this burst's records are the last ones pending.
        pending = min(after["pending"], count)
        lost = after["lost"] - before["lost"]
        not_forwarded = after["not_forwarded"] - before["not_forwarded"]
        return {"seq": first.seq, "count": count, "pending": pending, "lost": lost,
                "not_forwarded": not_forwarded,
                "delivered": count - pending - lost - not_forwarded,
                "guest_line": first.fault.guest_line() if first.fault else None,
                "note": first.note or None}

    @staticmethod
    def _event_from_args(event_id: EventId, sid: int, args: dict[str, Any]) -> EventRecord:
        """Build the record; refuse fields the architecture does not give this event type."""
        allowed = {"type", "sid", "ssid", "count"}
        if event_id in ADDRESS_EVENTS:
            allowed |= ACCESS_ARGS
        if event_id in FETCH_EVENTS:
            allowed.add("fetch-addr")
        extra = sorted(set(args) - allowed)
        if extra:
            raise CommandError(f"{event_id.name} records carry no {', '.join(extra)}")
        access = args.get("access", "read")
        if access not in ("read", "write", "exec"):
            raise CommandError(f"access must be read, write or exec, not {access!r}")
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

    def _cmd_query_endpoints(self, args: dict) -> list[dict]:
        return [self.device.endpoint_state(ep) for ep in sorted(self.device.endpoints)]

    def _cmd_query_domains(self, args: dict) -> list[dict]:
        return [d.to_dict() for _, d in sorted(self.device.domains.items())]

    def _cmd_query_events(self, args: dict) -> dict:
        trace = _trace_slice(self.relay.trace, lambda e: e.seq, args)
        return {**self.relay.counters(), "page_requests": self.page_requests.counters(),
                "trace": [e.to_dict() for e in trace]}

    def _cmd_query_requests(self, args: dict) -> dict:
        if self.requestq is not None:
            self.requestq.drain()
        trace = _trace_slice(self.device.request_trace, lambda e: e["seq"], args)
        # trace_dropped: served and counted, but their entries never reached the trace
        return {"counts": dict(self.device.request_counts),
                "status": dict(self.device.status_counts),
                "trace_dropped": self.device.trace_dropped, "trace": trace}

    def _cmd_query_translations(self, args: dict) -> dict:
        trace = _trace_slice(self.translator.dma_trace, lambda e: e["seq"], args)
        return {"transfers": self.translator.dma_count, "trace": trace}

    def _cmd_query_status(self, args: dict) -> dict:
        conn = self.connection
        return {
            "connected": conn is not None and not conn.closed,
            "queues": {str(i): {"size": vq.num, "last_avail": vq.last_avail,
                                "used_idx": vq.used_idx, "chains": vq.chains_seen,
                                "malformed": vq.chains_malformed,
                                "buffers_too_small": vq.buffers_too_small}
                       for i, (vq, _, _) in sorted(self.queues.items())},
            "driver_features": self.device.driver_features,
            "bypass": self.device.bypass,
            "resets": self.resets,
            "broken": self.broken,
            "vhost_user_messages": conn.messages_seen if conn else 0,
            # None: the requestq is served on the loop (no thread, or not running)
            "request_thread": self.requestq.counters() if self.requestq else None,
        }

    def _cmd_add_endpoint(self, args: dict) -> dict:
        endpoint = args["endpoint"]
        if not 0 <= endpoint <= 0xFFFF_FFFF:
            raise CommandError(f"endpoint must be a 32-bit ID, got {endpoint}")
        try:
            self.device.add_endpoint(endpoint)
        except ResourceLimit as exc:
            raise CommandError(f"cannot add endpoint {endpoint:#x}: {exc}") from None
        return self.device.endpoint_state(endpoint)

    def _guest_memory(self):
        conn = self.connection
        if conn is None or conn.closed or not conn.mem.regions_info:
            raise CommandError("no guest memory yet: the VM has not sent its memory table")
        return self.connection.mem

    def _cmd_memory_read(self, args: dict) -> dict:
        size = args["size"]
        if not 0 < size <= MAX_MEMORY_ACCESS:
            raise CommandError(f"size must be 1..{MAX_MEMORY_ACCESS}, got {size}")
        try:
            return {"data": self._guest_memory().read(args["gpa"], size).hex()}
        except (ValueError, OverflowError) as exc:
            raise CommandError(str(exc)) from None

    def _cmd_memory_write(self, args: dict) -> dict:
        try:
            data = bytes.fromhex(args["data"])
        except ValueError:
            raise CommandError("data must be hex digits, two per byte") from None
        if not 0 < len(data) <= MAX_MEMORY_ACCESS:
            raise CommandError(f"data must be 1..{MAX_MEMORY_ACCESS} bytes, got {len(data)}")
        try:
            self._guest_memory().write(args["gpa"], data)
        except (ValueError, OverflowError) as exc:
            raise CommandError(str(exc)) from None
        return {"written": len(data)}

    def _cmd_endpoint_create(self, args: dict) -> dict:
        sid = args["endpoint"]
        if not 0 <= sid <= MAX_REQUESTER_ID:
            raise CommandError(f"endpoint must be a PCI requester ID 0..{MAX_REQUESTER_ID:#x} "
                               f"(the VIOT maps endpoint ID = requester ID), got {sid}")
        if sid in self.endpoint_servers:
            raise CommandError(f"endpoint {sid:#x} is already served; endpoint-delete it first")
        default_dir = os.path.dirname(self.control_path or self.socket_path)
        path = args.get("socket") or os.path.join(default_dir, f"endpoint-{sid:x}.sock")
        pri = PriState(enabled=args.get("pri", False))  # kept only once the endpoint is served
        device = DmaEndpoint(
            dma=lambda _memory: self.translator.dma_port(sid, pri, self.page_requests))
        server = EndpointServer(path, device, name=f"endpoint {sid:#x}")
        try:
            server.listen(self.loop)
        except (OSError, ValueError) as exc:  # UnicodeError is a ValueError
            raise CommandError(f"cannot listen on {path!r}: {exc}") from None
        try:
            self.device.add_endpoint(sid)
        except ResourceLimit as exc:
            server.close()
            raise CommandError(f"cannot add endpoint {sid:#x}: {exc}") from None
        self.endpoint_servers[sid] = server
        self.pri[sid] = pri
        return {"endpoint": sid, "socket": path, "pri": pri.to_dict()}

    def _cmd_endpoint_delete(self, args: dict) -> dict:
        server = self.endpoint_servers.pop(args["endpoint"], None)
        if server is None:
            raise CommandError(f"endpoint {args['endpoint']:#x} is not served here")
        server.close()
        return {}

    def _cmd_attach_table(self, args: dict) -> dict:
        sid = args["sid"]
        if sid not in self.device.endpoints:
            raise CommandError(f"sid {sid:#x} is not an endpoint of this vIOMMU")
        words = (args["ste0"], args.get("ste1", 0))
        if not all(0 <= w < 1 << 64 for w in words):
            raise CommandError("ste0 and ste1 are 64-bit words")
        self.device.bind_table(sid, *words)
        return self.device.endpoint_state(sid)

    def _cmd_stage2_set(self, args: dict) -> dict:
        access = args["access"]
        if access not in ("rw", "ro", "none"):
            raise CommandError(f"access must be rw, ro or none, not {access!r}")
        engine = self._engine()
        try:
            pages = engine.s2_set_perm(args["ipa"], args["size"], access != "none",
                                       access == "rw")
        except (ValueError, OverflowError) as exc:
            raise CommandError(str(exc)) from None
        return {"pages": pages}

    def _cmd_stage2_reset(self, args: dict) -> dict:
        self._engine().s2_reset()
        return {}

    def _engine(self):
        if self.translator.engine is None:
            raise CommandError("no guest memory yet: the VM has not sent its memory table")
        return self.translator.engine

    def _cmd_inject_page_request(self, args: dict) -> dict:
        sid = args["sid"]
        if sid not in self.device.endpoints:
            raise CommandError(f"sid {sid:#x} is not an endpoint of this vIOMMU")
        access = args.get("access", "read")
        if access not in ("read", "write", "exec"):
            raise CommandError(f"access must be read, write or exec, not {access!r}")
        stop = args.get("stop-marker", False)
        try:
            request = PageRequest(
                sid, args.get("grpid", 0), args["address"], last=stop or args.get("last", True),
                read=not stop and access != "write", write=not stop and access == "write",
                exec=not stop and access == "exec", priv=args.get("privileged", False),
                pasid=args.get("pasid"))
        except ValueError as exc:
            raise CommandError(str(exc)) from None

        def answered(code: ResponseCode) -> None:
            self.control.emit("PAGE_RESPONSE", {"sid": sid, "pasid": request.pasid,
                                                "grpid": request.grpid, "code": code.name})

        self.page_requests.submit(request, answered)
        return self.page_requests.counters()

    def _cmd_page_response(self, args: dict) -> dict:
        codes = {"success": ResponseCode.SUCCESS, "invalid": ResponseCode.INVALID_REQUEST,
                 "failure": ResponseCode.RESPONSE_FAILURE}
        if args["code"] not in codes:
            raise CommandError(f"code must be success, invalid or failure, not {args['code']!r}")
        try:
            self.page_requests.respond(args["id"], codes[args["code"]], "controller")
        except KeyError as exc:
            raise CommandError(exc.args[0]) from None
        return self.page_requests.counters()

    def _cmd_set_policy(self, args: dict) -> dict:
        try:
            self.page_requests.set_policy(args["policy"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return {"policy": self.page_requests.policy}

    def _cmd_query_page_requests(self, args: dict) -> dict:
        return {**self.page_requests.counters(),
                "pending": [g.to_dict() for g in self.page_requests.pending.values()],
                "pri": {str(sid): state.to_dict() for sid, state in self.pri.items()}}

    def _cmd_pasid_unbind(self, args: dict) -> dict:
        answered = self.page_requests.drain(args["sid"], args.get("pasid"))
        return {"groups_answered": answered, **self.relay.counters()}

    def _cmd_quit(self, args: dict) -> dict:
        self.loop.call_soon(self._stopped.set)
        return {}


_RESPONSE_OF_PAGE_RESP = {
    PageRespCode.SUCCESS: ResponseCode.SUCCESS,
    PageRespCode.INVALID: ResponseCode.INVALID_REQUEST,
    PageRespCode.FAILURE: ResponseCode.RESPONSE_FAILURE,
}


def _limit(args: dict) -> int:
    limit = args.get("limit", 100)
    if limit < 0:
        raise CommandError(f"limit must be >= 0, got {limit}")
    return min(limit, sys.maxsize)  # any larger limit means "all" (islice takes no more)


_TRACE_ARGS = (
    Arg("limit", (int,), help="trace entries to return (default 100): the newest, or with "
                              "`since` the oldest after it"),
    Arg("since", (int,), help="only entries with a larger seq: a cursor for following the trace"),
)


def _trace_slice(trace: Iterable[Any], seq: Callable[[Any], int], args: dict) -> list:
    """The newest `limit` entries; with `since`, the oldest `limit` after it, so a client
    polling with the last seq it saw as its cursor misses nothing that is still kept."""
    limit = _limit(args)
    if "since" not in args:
        return list(trace)[-limit:] if limit else []
    since = args["since"]
    return list(itertools.islice((e for e in trace if seq(e) > since), limit))


def _version_tuple() -> tuple[int, int, int]:
    parts = [int(p) for p in __version__.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]

