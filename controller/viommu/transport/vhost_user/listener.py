"""The vhost-user listening socket of one device: one front-end (QEMU) at a time.

It mirrors the vfio-user server (viommu.transport.vfio_user.server): the listener owns
accepting and the socket's life; `VhostUserConnection` owns the protocol; the device
(`VhostUserDevice`) never sees either.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from viommu.transport.sockets import listen_private_unix, unlink_quietly
from viommu.transport.vhost_user.connection import VhostUserConnection, VhostUserDevice

log = logging.getLogger(__name__)


class VhostUserListener:
    def __init__(self, socket_path: str, device: VhostUserDevice,
                 on_disconnect: Callable[[], None], listen_fd: int | None = None) -> None:
        """`on_disconnect` runs when the front-end goes. `listen_fd`: a socket already bound
        at `socket_path` and listening (a launcher made it, so QEMU could start at once)."""
        self.socket_path = socket_path
        self.device = device
        self.on_disconnect = on_disconnect
        self.listen_fd = listen_fd
        self.connection: VhostUserConnection | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self.connection is not None and not self.connection.closed

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Accept on `loop`; call from the loop's thread."""
        self.loop = loop
        if self.listen_fd is not None:
            self._listener = socket.socket(fileno=self.listen_fd)
            self._listener.setblocking(False)
        else:
            self._listener = listen_private_unix(self.socket_path)
        loop.add_reader(self._listener.fileno(), self._accept)
        log.info("vhost-user: listening on %s", self.socket_path)

    def close(self) -> None:
        """Drop the front-end and stop listening; call from the loop's thread."""
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
            log.error("vhost-user: refusing a second front-end; one VM per backend")
            sock.close()
            return
        sock.setblocking(True)
        log.info("vhost-user: front-end connected")
        if self.connection is not None:
            self.device.reset("a new front-end connected")  # another VM: nothing carries over
        self.connection = VhostUserConnection(sock, self.device, self.loop)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        conn = self.connection
        conn.on_readable()
        if conn.closed:
            self.on_disconnect()
