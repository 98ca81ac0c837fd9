"""endpoint-create and endpoint-delete: DMA endpoints served over vfio-user."""

from __future__ import annotations

from typing import Any

from viommu.backend.endpoint_servers import EndpointError, EndpointServers
from viommu.transport.control import Arg, Command, CommandError, ControlServer


class EndpointCommands:
    def __init__(self, servers: EndpointServers) -> None:
        self.servers = servers

    def register(self, control: ControlServer) -> None:
        control.register(Command("endpoint-create", self.endpoint_create, (
            Arg("endpoint", (int,), True, "endpoint ID (= PCI requester ID it will have)"),
            Arg("socket", (str,), help="vfio-user socket path (default: beside control)"),
            Arg("pri", (bool,), help="PCIe PRI: ask for non-present pages (page requests)")),
            help="Serve a DMA endpoint over vfio-user; every DMA goes through translation"))
        control.register(Command("endpoint-delete", self.endpoint_delete, (
            Arg("endpoint", (int,), True),), help="Stop serving a DMA endpoint"))

    def endpoint_create(self, args: dict[str, Any]) -> dict:
        sid = args["endpoint"]
        try:
            path, pri = self.servers.create(sid, args.get("socket"), args.get("pri", False))
        except EndpointError as exc:
            raise CommandError(str(exc)) from None
        return {"endpoint": sid, "socket": path, "pri": pri.to_dict()}

    def endpoint_delete(self, args: dict[str, Any]) -> dict:
        try:
            self.servers.delete(args["endpoint"])
        except EndpointError as exc:
            raise CommandError(str(exc)) from None
        return {}
