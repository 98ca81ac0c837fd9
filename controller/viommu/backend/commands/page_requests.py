"""Page-request commands: inject a request as an endpoint would, answer a group, choose
the answering policy, look at what waits, and unbind a PASID."""

from __future__ import annotations

from typing import Any

from viommu.backend.commands.events import access_arg
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.endpoints.dma_port import PriState
from viommu.events.page_requests import Announcer, PageRequest, PageRequestRelay, ResponseCode
from viommu.events.relay import EventRelay
from viommu.transport.control import Arg, Command, CommandError, ControlServer

RESPONSE_CODES = {"success": ResponseCode.SUCCESS, "invalid": ResponseCode.INVALID_REQUEST,
                  "failure": ResponseCode.RESPONSE_FAILURE}


class PageRequestCommands:
    def __init__(self, device: VirtioIommuDevice, relay: EventRelay,
                 page_requests: PageRequestRelay, pri: dict[int, PriState],
                 announcer: Announcer) -> None:
        self.device = device
        self.relay = relay
        self.page_requests = page_requests
        self.pri = pri  # each served endpoint's PCIe PRI state
        self.announcer = announcer

    def register(self, control: ControlServer) -> None:
        control.register(Command("inject-page-request", self.inject_page_request, (
            Arg("sid", (int,), True), Arg("address", (int,), True, "page address"),
            Arg("grpid", (int,), help="Page Request Group Index (default 0)"),
            Arg("pasid", (int,)), Arg("access", (str,), help="read (default), write or exec"),
            Arg("privileged", (bool,)), Arg("last", (bool,), help="last of its group (default)"),
            Arg("stop-marker", (bool,), help="a Stop Marker: L=1, no access, no response")),
            help="Inject a PCIe page request as an endpoint would issue it"))
        control.register(Command("page-response", self.page_response, (
            Arg("id", (int,), True, "group id from PAGE_REQUEST / query-page-requests"),
            Arg("code", (str,), True, "success, invalid or failure")),
            help="Answer a page request group (policy host)"))
        control.register(Command("set-page-request-policy", self.set_policy, (
            Arg("policy", (str,), True, "invalid, host or guest"),),
            help="How page request groups are answered"))
        control.register(Command("query-page-requests", self.query_page_requests,
                                 help="Page request counters and the groups waiting for an "
                                      "answer"))
        control.register(Command("pasid-unbind", self.pasid_unbind, (
            Arg("sid", (int,), True), Arg("pasid", (int,), help="default: every PASID")),
            help="Unbind a PASID: drain its page requests before it is reused"))

    def inject_page_request(self, args: dict[str, Any]) -> dict:
        sid = args["sid"]
        if sid not in self.device.endpoints:
            raise CommandError(f"sid {sid:#x} is not an endpoint of this vIOMMU")
        access = access_arg(args)
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
            self.announcer.emit("PAGE_RESPONSE", {"sid": sid, "pasid": request.pasid,
                                                  "grpid": request.grpid, "code": code.name})

        self.page_requests.submit(request, answered)
        return self.page_requests.counters()

    def page_response(self, args: dict[str, Any]) -> dict:
        if args["code"] not in RESPONSE_CODES:
            raise CommandError(f"code must be success, invalid or failure, not {args['code']!r}")
        try:
            self.page_requests.respond(args["id"], RESPONSE_CODES[args["code"]], "controller")
        except KeyError as exc:
            raise CommandError(exc.args[0]) from None
        return self.page_requests.counters()

    def set_policy(self, args: dict[str, Any]) -> dict:
        try:
            self.page_requests.set_policy(args["policy"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return {"policy": self.page_requests.policy}

    def query_page_requests(self, args: dict[str, Any]) -> dict:
        return {**self.page_requests.counters(),
                "pending": [g.to_dict() for g in self.page_requests.pending.values()],
                "pri": {str(sid): state.to_dict() for sid, state in self.pri.items()}}

    def pasid_unbind(self, args: dict[str, Any]) -> dict:
        answered = self.page_requests.drain(args["sid"], args.get("pasid"))
        return {"groups_answered": answered, **self.relay.counters()}
