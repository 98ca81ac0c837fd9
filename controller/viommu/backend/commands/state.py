"""What the device holds and how it is connected: endpoints, domains, requests, DMA
translations, the front-end and its rings; and the two ways to change which streams
exist and how they translate from outside the guest (add-endpoint, attach-table)."""

from __future__ import annotations

from typing import Any

from viommu.backend.commands.traces import TRACE_ARGS, trace_slice
from viommu.backend.vhost_device import IommuVhostDevice
from viommu.dataplane.translation import Translator
from viommu.device.config import ResourceLimit
from viommu.transport.control import Arg, Command, CommandError, ControlServer
from viommu.transport.vhost_user.listener import VhostUserListener


class StateCommands:
    def __init__(self, vhost: IommuVhostDevice, translator: Translator,
                 listener: VhostUserListener) -> None:
        self.vhost = vhost
        self.device = vhost.device
        self.translator = translator
        self.listener = listener

    def register(self, control: ControlServer) -> None:
        for name, handler, args, text in (
            ("query-endpoints", self.query_endpoints, (), "Endpoints, their domains and modes"),
            ("query-domains", self.query_domains, (),
             "Domains with their endpoints and mappings"),
            ("query-requests", self.query_requests, TRACE_ARGS, "Request counters and trace"),
            ("query-translations", self.query_translations, TRACE_ARGS,
             "Endpoints' DMA translations (one entry a transfer)"),
            ("query-status", self.query_status, (),
             "Front-end connection, queues, features, resets"),
        ):
            control.register(Command(name, handler, args, help=text))
        control.register(Command("add-endpoint", self.add_endpoint,
                                 (Arg("endpoint", (int,), True,
                                      "endpoint ID (= PCI requester ID)"),),
                                 help="Declare an endpoint behind this vIOMMU (before hot-plug)"))
        control.register(Command("attach-table", self.attach_table, (
            Arg("sid", (int,), True), Arg("ste0", (int,), True, "STE dword 0"),
            Arg("ste1", (int,), help="STE dword 1 (default 0)")),
            help="Bind a stream to SMMUv3 tables in guest memory (page-table mode)"))

    def query_endpoints(self, args: dict[str, Any]) -> list[dict]:
        return [self.device.endpoint_state(ep) for ep in sorted(self.device.endpoints)]

    def query_domains(self, args: dict[str, Any]) -> list[dict]:
        return [d.to_dict() for _, d in sorted(self.device.domains.items())]

    def query_requests(self, args: dict[str, Any]) -> dict:
        if self.vhost.requestq is not None:
            self.vhost.requestq.drain()
        log = self.device.requests
        trace = trace_slice(log.trace, lambda e: e["seq"], args)
        # trace_dropped: served and counted, but their entries never reached the trace
        return {"counts": dict(log.counts), "status": dict(log.statuses),
                "trace_dropped": log.dropped, "trace": trace}

    def query_translations(self, args: dict[str, Any]) -> dict:
        trace = trace_slice(self.translator.dma_trace, lambda e: e["seq"], args)
        return {"transfers": self.translator.dma_count, "trace": trace}

    def query_status(self, args: dict[str, Any]) -> dict:
        conn = self.listener.connection
        requestq = self.vhost.requestq
        return {
            "connected": self.listener.connected,
            "queues": {str(i): {"size": ring.vq.num, "last_avail": ring.vq.last_avail,
                                "used_idx": ring.vq.used_idx, "chains": ring.vq.chains_seen,
                                "malformed": ring.vq.chains_malformed,
                                "buffers_too_small": ring.vq.buffers_too_small}
                       for i, ring in sorted(self.vhost.rings().items())},
            "driver_features": self.device.driver_features,
            "bypass": self.device.bypass,
            "resets": self.vhost.resets,
            "broken": self.vhost.broken,
            "vhost_user_messages": conn.messages_seen if conn else 0,
            # None: the requestq is served on the loop (no thread, or not running)
            "request_thread": requestq.counters() if requestq else None,
            # None: the eventq is served on the loop
            "event_thread": self.vhost.eventq.counters(),
        }

    def add_endpoint(self, args: dict[str, Any]) -> dict:
        endpoint = args["endpoint"]
        if not 0 <= endpoint <= 0xFFFF_FFFF:
            raise CommandError(f"endpoint must be a 32-bit ID, got {endpoint}")
        try:
            self.device.add_endpoint(endpoint)
        except ResourceLimit as exc:
            raise CommandError(f"cannot add endpoint {endpoint:#x}: {exc}") from None
        return self.device.endpoint_state(endpoint)

    def attach_table(self, args: dict[str, Any]) -> dict:
        sid = args["sid"]
        if sid not in self.device.endpoints:
            raise CommandError(f"sid {sid:#x} is not an endpoint of this vIOMMU")
        words = (args["ste0"], args.get("ste1", 0))
        if not all(0 <= w < 1 << 64 for w in words):
            raise CommandError("ste0 and ste1 are 64-bit words")
        self.device.bind_table(sid, *words)
        return self.device.endpoint_state(sid)
