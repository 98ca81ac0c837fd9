"""The endpoints this backend serves over vfio-user, each behind the vIOMMU: DMA engines
(viommu.endpoints.dma_engine) and virtio-blk disks (viommu.endpoints.virtio_blk).

One vfio-user server per endpoint (viommu.transport.vfio_user.server). A DMA engine's port
translates every access through the engine (viommu.endpoints.dma_port), and with PCIe PRI
its page requests go to the page-request relay; a disk's queue walks its rings and buffers
through the engine too.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from viommu.dataplane.translation import Translator
from viommu.device.config import ResourceLimit
from viommu.device.streams import SERVED
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.endpoints.dma_engine import DmaEndpoint
from viommu.endpoints.dma_port import PriState, TranslatingDma
from viommu.endpoints.virtio_blk import BlkOptions, blk_function
from viommu.endpoints.virtio_pci import VirtioPciFunction
from viommu.events.page_requests import PageRequestRelay
from viommu.transport.sockets import Readers
from viommu.transport.vfio_user.server import EndpointServer

MAX_REQUESTER_ID = 0xFFFF  # bus:device.function


class EndpointError(ValueError):
    """An endpoint cannot be created or removed; the message says why."""


class EndpointServers:
    def __init__(self, device: VirtioIommuDevice, translator: Translator,
                 page_requests: PageRequestRelay, readers: Readers, socket_dir: str,
                 emit: Callable[[str, dict], None] = lambda name, data: None) -> None:
        """`emit(name, data)`: a control event (VIRTIO_NEEDS_RESET from a disk)."""
        self.device = device
        self.translator = translator
        self.page_requests = page_requests
        self.readers = readers
        self.socket_dir = socket_dir  # default home of endpoint sockets and disk images
        self.emit = emit
        self.servers: dict[int, EndpointServer] = {}
        self.pri: dict[int, PriState] = {}

    def create(self, sid: int, socket_path: str | None = None, pri: bool = False,
               blk: BlkOptions | None = None) -> tuple[str, PriState]:
        """Serve an endpoint with requester ID `sid`: a DMA engine, or with `blk` a
        virtio-blk disk; returns its socket and PRI state."""
        if not 0 <= sid <= MAX_REQUESTER_ID:
            raise EndpointError(f"endpoint must be a PCI requester ID 0..{MAX_REQUESTER_ID:#x} "
                                f"(the VIOT maps endpoint ID = requester ID), got {sid:#x}")
        if sid in self.servers:
            raise EndpointError(f"endpoint {sid:#x} is already served; endpoint-delete it first")
        if blk is not None and pri:
            raise EndpointError("PCIe PRI is a DMA engine's; a virtio-blk disk has none")
        path = socket_path or os.path.join(self.socket_dir, f"endpoint-{sid:x}.sock")
        state = PriState(enabled=pri)  # kept only once the endpoint is served
        device = self._disk(sid, blk) if blk is not None else DmaEndpoint(
            dma=lambda _memory: TranslatingDma(self.translator, sid, state, self.page_requests))
        server = EndpointServer(path, device, name=f"endpoint {sid:#x}")
        try:
            server.listen(self.readers)
        except (OSError, ValueError) as exc:  # UnicodeError is a ValueError
            device.close()
            raise EndpointError(f"cannot listen on {path!r}: {exc}") from None
        try:
            self.device.add_endpoint(sid, SERVED)
        except ResourceLimit as exc:
            server.close()
            device.close()
            raise EndpointError(f"cannot add endpoint {sid:#x}: {exc}") from None
        self.servers[sid] = server
        self.pri[sid] = state
        return path, state

    @property
    def disks(self) -> dict[int, VirtioPciFunction]:
        """The virtio-blk disks among the endpoints served, by requester ID."""
        return {sid: server.device for sid, server in self.servers.items()
                if isinstance(server.device, VirtioPciFunction)}

    def guest_absence(self, sid: int) -> str | None:
        """Why the guest does not have endpoint `sid`, or None (VirtioIommuDevice's rule,
        with whether QEMU is connected to the device we serve there)."""
        server = self.servers.get(sid)
        return self.device.guest_absence(sid, plugged=server is not None and server.connected)
    def _disk(self, sid: int, blk: BlkOptions) -> VirtioPciFunction:
        def needs_reset(why: str) -> None:
            self.emit("VIRTIO_NEEDS_RESET", {"endpoint": sid, "reason": why})

        try:
            return blk_function(sid, blk, self.translator, needs_reset)
        except (OSError, ValueError) as exc:
            raise EndpointError(f"cannot open the disk image {blk.image!r}: {exc}") from None

    def default_image(self, sid: int) -> str:
        return os.path.join(self.socket_dir, f"blk-{sid:x}.img")

    def delete(self, sid: int) -> None:
        server = self.servers.pop(sid, None)
        if server is None:
            raise EndpointError(f"endpoint {sid:#x} is not served here")
        server.close()
        server.device.close()
        self.pri.pop(sid, None)

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
            server.device.close()
