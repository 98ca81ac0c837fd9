"""The viommu backend process: a virtio-iommu served over vhost-user, plus its control server.

`Backend` is the composition root: it builds the device, the event and page-request relays,
the translation engine's keeper, the vhost-user device and listener, the endpoint servers
and the control commands, and runs them on one asyncio loop. The requestq and the eventq have
threads of their own (viommu.dataplane.requestq, viommu.dataplane.eventq) when the loop is the
backend's own data-plane loop (`run()`, `start_in_thread()`): the loop holds the data-plane
lock outside its waits, so loop code never races them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import Coroutine, Iterable
from typing import Any

from viommu import __version__
from viommu._dataplane import DataplaneLock
from viommu.backend.commands.endpoints import EndpointCommands
from viommu.backend.commands.events import EventCommands
from viommu.backend.commands.memory import MemoryCommands
from viommu.backend.commands.page_requests import PageRequestCommands
from viommu.backend.commands.state import StateCommands
from viommu.backend.endpoint_servers import EndpointServers
from viommu.backend.iommufd_edge import IommufdEdge
from viommu.backend.vhost_device import IommuVhostDevice
from viommu.dataplane.loop import DeferredLoop, dataplane_event_loop
from viommu.dataplane.requestq import DEFAULT_POLL_US, RequestThreadOptions
from viommu.dataplane.translation import Translator
from viommu.device.config import DeviceConfig
from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.events.page_requests import PageRequestRelay
from viommu.events.relay import EventRelay
from viommu.transport.control import Command, ControlServer
from viommu.transport.iommufd import FaultQueue, VeventQueue
from viommu.transport.sockets import Readers, unlink_quietly
from viommu.transport.vhost_user.listener import VhostUserListener

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    event_capacity: int = 1024  # fault records held while the guest posts no buffer
    exit_on_disconnect: bool = True  # the VM is gone: nothing left to serve
    page_request_policy: str = "invalid"
    request_thread: bool = True  # serve the requestq on its own thread when possible
    event_thread: bool = True  # and the eventq on another
    poll_us: float = DEFAULT_POLL_US  # the cap of that thread's busy-poll window
    adaptive_poll: bool = True  # the window follows what polling earns (else: poll_us)
    null_device: bool = False  # benchmark floor: the thread answers every request S_OK


class Backend:
    """A virtio-iommu vhost-user back-end for one VM."""

    def __init__(self, socket_path: str, control_path: str | None, endpoints: Iterable[int],
                 config: DeviceConfig | None = None, options: BackendOptions | None = None,
                 listen_fds: tuple[int, int | None] | None = None) -> None:
        """`listen_fds`: the vhost-user and control sockets, already bound at the two paths
        and listening (the launcher made them, so QEMU could start without waiting)."""
        self.options = options = options or BackendOptions()
        self.socket_path = socket_path
        self.control_path = control_path
        self.listen_fds = listen_fds
        self.loop = DeferredLoop()
        self.lock = DataplaneLock()
        self.control = ControlServer("viommu " + __version__, _version_tuple())
        self.relay = EventRelay(capacity=options.event_capacity)
        self.page_requests = PageRequestRelay(self.relay, self.control, self.loop,
                                              policy=options.page_request_policy)
        self.device = VirtioIommuDevice(endpoints, config, page_responder=self.page_requests)
        self.device.observe(self.page_requests)
        self.translator = Translator(self.device, self.relay)
        self.vhost = IommuVhostDevice(self.device, self.relay, self.page_requests,
                                      self.translator, self.control,
                                      RequestThreadOptions(options.poll_us, options.adaptive_poll,
                                                           options.null_device))
        self.listener = VhostUserListener(socket_path, self.vhost, self._frontend_gone,
                                          listen_fds[0] if listen_fds else None)
        self.endpoints = EndpointServers(self.device, self.translator, self.page_requests,
                                         self.loop,
                                         os.path.dirname(control_path or socket_path),
                                         self.control.emit)
        self.iommufd = IommufdEdge(self.relay, self.page_requests, self.control)
        for commands in (EventCommands(self.device, self.relay, self.page_requests,
                                       self.endpoints.guest_absence),
                         PageRequestCommands(self.device, self.relay, self.page_requests,
                                             self.endpoints.pri, self.control),
                         StateCommands(self.vhost, self.translator, self.listener),
                         MemoryCommands(self.translator), EndpointCommands(self.endpoints)):
            commands.register(self.control)
        self.control.register(Command("quit", self._quit, help="Stop the backend"))
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Listen on both sockets and serve until `stop()` (or the front-end leaves)."""
        loop = asyncio.get_running_loop()
        self.loop.bind(loop)
        self._stopped = asyncio.Event()
        self.listener.listen(loop)
        if self.control_path:
            control_fd = self.listen_fds[1] if self.listen_fds else None
            await self.control.listen_unix(self.control_path, control_fd)
        await self._stopped.wait()
        await self.control.close()
        self.endpoints.close()
        self.listener.close()
        if self.control_path:
            unlink_quietly(self.control_path)

    def stop(self) -> None:
        """Ask the loop to finish; harmless when it already has (the VM left first)."""
        loop = self.loop.loop
        if loop is not None and self._stopped is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stopped.set)
            except RuntimeError:  # closed between the check and the call
                pass

    def run(self) -> None:
        """Serve on a new data-plane loop in this thread until `stop()`."""
        self._run(self.serve())

    def start_in_thread(self) -> None:
        """Run the backend inside this process; returns once both sockets listen."""
        ready = threading.Event()

        async def main() -> None:
            task = asyncio.ensure_future(self.serve())
            while self._stopped is None or (self.control_path and not self.control.listening):
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

    def _run(self, main: Coroutine[Any, Any, None]) -> None:
        # This loop shares the data plane with the queue threads: it holds the lock outside
        # its waits (viommu.dataplane.loop).
        self.vhost.use_threads(self.lock, self.loop, requests=self.options.request_thread,
                               events=self.options.event_thread)
        with asyncio.Runner(loop_factory=lambda: dataplane_event_loop(self.lock)) as runner:
            runner.run(main)

    def _frontend_gone(self) -> None:
        self.control.emit("FRONTEND_DISCONNECTED", {})
        if self.options.exit_on_disconnect:
            log.warning("vhost-user: the VM is gone; backend exits")
            self._stopped.set()

    def _quit(self, args: dict) -> dict:
        self.loop.loop.call_soon(self._stopped.set)
        return {}

    # --- the iommufd host edge ----------------------------------------------------------------

    def attach_iommufd(self, fault_fd: int | None, veventq_fd: int | None,
                       dev_to_sid: dict[int, int], readers: Readers | None = None
                       ) -> list[FaultQueue | VeventQueue]:
        """Take a real host's IO page faults (iommufd fault fd) and SMMUv3 events (vEVENTQ
        fd) for our endpoints, read on `readers` (default: the backend's loop)."""
        return self.iommufd.attach(fault_fd, veventq_fd, dev_to_sid, readers or self.loop)


def _version_tuple() -> tuple[int, int, int]:
    parts = [int(p) for p in __version__.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]
