"""endpoint-create, endpoint-delete and query-disks: endpoints served over vfio-user (DMA
engines, and virtio-blk disks backed by image files)."""

from __future__ import annotations

from typing import Any

from viommu.backend.endpoint_servers import EndpointError, EndpointServers
from viommu.endpoints.virtio_blk import DEFAULT_SIZE, BlkOptions
from viommu.transport.control import Arg, Command, CommandError, ControlServer

KINDS = ("dma", "blk")


class EndpointCommands:
    def __init__(self, servers: EndpointServers) -> None:
        self.servers = servers

    def register(self, control: ControlServer) -> None:
        control.register(Command("endpoint-create", self.endpoint_create, (
            Arg("endpoint", (int,), True, "endpoint ID (= PCI requester ID it will have)"),
            Arg("socket", (str,), help="vfio-user socket path (default: beside control)"),
            Arg("kind", (str,), help="dma (default): the DMA engine; blk: a virtio-blk disk"),
            Arg("pri", (bool,), help="PCIe PRI: ask for non-present pages (page requests)"),
            Arg("image", (str,), help="blk: the raw image file (default: blk-ID.img beside "
                                      "control; created when missing)"),
            Arg("size", (int,), help=f"blk: bytes of a new image (default {DEFAULT_SIZE})"),
            Arg("read-only", (bool,), help="blk: offer VIRTIO_BLK_F_RO; writes fail"),
            Arg("indirect", (bool,), help="blk: offer indirect descriptors (default true)"),
            Arg("discard", (bool,), help="blk: offer DISCARD and WRITE_ZEROES (default true)"),
            Arg("msix", (bool,), help="blk: interrupts by MSI-X (default true), else INTx")),
            help="Serve an endpoint over vfio-user; every DMA goes through translation"))
        control.register(Command("endpoint-delete", self.endpoint_delete, (
            Arg("endpoint", (int,), True),), help="Stop serving an endpoint"))
        control.register(Command("query-disks", self.query_disks, (),
                                 help="virtio-blk endpoints: image, transport, queue counters"))

    def endpoint_create(self, args: dict[str, Any]) -> dict:
        sid = args["endpoint"]
        kind = args.get("kind", "dma")
        if kind not in KINDS:
            raise CommandError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        blk_args = [name for name in ("image", "size", "read-only", "indirect", "discard",
                                      "msix") if name in args]
        if kind != "blk" and blk_args:
            raise CommandError(f"{', '.join(blk_args)}: only for kind blk")
        blk = self._blk_options(sid, args) if kind == "blk" else None
        try:
            path, pri = self.servers.create(sid, args.get("socket"), args.get("pri", False),
                                            blk=blk)
        except EndpointError as exc:
            raise CommandError(str(exc)) from None
        reply = {"endpoint": sid, "socket": path, "kind": kind, "pri": pri.to_dict()}
        if blk is not None:
            reply.update(image=blk.image, size=self.servers.disks[sid].device.size)
        return reply

    def _blk_options(self, sid: int, args: dict[str, Any]) -> BlkOptions:
        try:
            return BlkOptions(image=args.get("image") or self.servers.default_image(sid),
                              size=args.get("size", DEFAULT_SIZE),
                              read_only=args.get("read-only", False),
                              indirect=args.get("indirect", True),
                              discard=args.get("discard", True),
                              msix=args.get("msix", True))
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    def endpoint_delete(self, args: dict[str, Any]) -> dict:
        try:
            self.servers.delete(args["endpoint"])
        except EndpointError as exc:
            raise CommandError(str(exc)) from None
        return {}

    def query_disks(self, args: dict[str, Any]) -> list[dict]:
        out = []
        for sid, disk in sorted(self.servers.disks.items()):
            server = self.servers.servers[sid]
            out.append({"endpoint": sid, "socket": server.socket_path,
                        "connected": server.connected, "virtio": disk.state(),
                        **disk.device.state()})
        return out
