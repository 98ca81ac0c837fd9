"""A vfio-user listening socket for one device: one client (QEMU's vfio-user-pci) at a time.

`EndpointServer(path, device).listen(loop)` serves from an existing asyncio loop (call it in
the loop's thread); `start_in_thread()` runs a private loop in a thread, for tests and for
a controller that has no loop of its own. The device outlives its connections: when QEMU
unplugs the device, or dies, the next client finds the device state as it was left.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from viommu.transport.sockets import Readers, listen_private_unix, unlink_quietly
from viommu.transport.vfio_user.connection import VfioUserConnection, VfioUserDevice

log = logging.getLogger(__name__)
T = TypeVar("T")


class EndpointServer:
    def __init__(self, socket_path: str, device: VfioUserDevice, name: str = "vfio-user") -> None:
        self.socket_path = socket_path
        self.device = device
        self.name = name
        self.connection: VfioUserConnection | None = None
        self.accepted = 0
        self.refused = 0
        self.disconnects = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    @property
    def connected(self) -> bool:
        return self.connection is not None and not self.connection.closed

    # --- on an existing loop --------------------------------------------------------------

    def listen(self, loop: Readers) -> None:
        """Bind (mode 0600: the client gets our memory-mapping and interrupt rights) and
        accept on `loop`; call from the loop's thread."""
        sock = listen_private_unix(self.socket_path)
        self.loop = loop
        self._listener = sock
        loop.add_reader(sock.fileno(), self._accept)
        log.info("%s: listening on %s", self.name, self.socket_path)

    def close(self) -> None:
        """Stop listening and drop the client; call from the loop's thread."""
        if self.connection is not None:
            self.connection.close()
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            unlink_quietly(self.socket_path)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self.connected:
            # One device, one client: a second QEMU would fight the first over its state.
            self.refused += 1
            log.error("%s: refusing a second client; unplug the first (device_del) before "
                      "plugging this device again", self.name)
            sock.close()
            return
        sock.setblocking(True)
        self.accepted += 1
        log.info("%s: client connected", self.name)
        self.connection = VfioUserConnection(sock, self.device, self.loop.remove_reader,
                                             self.name)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        conn = self.connection
        conn.on_readable()
        if conn.closed:
            self.disconnects += 1
            log.info("%s: client gone after %d messages", self.name, sum(conn.commands.values()))

    # --- in a thread of its own -------------------------------------------------------------

    def start_in_thread(self, timeout: float = 10) -> None:
        """Run a private event loop in a daemon thread; returns once the socket listens."""
        ready = threading.Event()
        failure: list[OSError] = []

        async def main() -> None:
            self._stop = asyncio.Event()
            try:
                self.listen(asyncio.get_running_loop())
            except OSError as exc:  # reported by the caller's thread, below
                failure.append(exc)
                return
            finally:
                ready.set()
            try:
                await self._stop.wait()
            finally:
                self.close()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),),
                                        name=f"{self.name}-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"{self.name}: the server did not listen on {self.socket_path} "
                               f"within {timeout:g} s")
        if failure:
            raise RuntimeError(f"{self.name}: cannot listen on {self.socket_path}: "
                               f"{failure[0]}") from failure[0]

    def stop(self, timeout: float = 5) -> None:
        """End the thread started by start_in_thread(); harmless when it has ended."""
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed between the check and the call
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 10) -> T:
        """Run fn(*args) in the server's loop thread and return its result: the device and
        the connection belong to that thread."""
        return asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop).result(timeout)


async def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)

