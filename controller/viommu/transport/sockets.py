"""Unix sockets the backend listens on: created 0600, so only our user may connect (a peer
gets our guest-memory mappings and interrupt rights)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Protocol


class Readers(Protocol):
    """Watches fds for readability: an asyncio loop, or a test's stand-in."""

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...


def listen_private_unix(path: str) -> socket.socket:
    """A non-blocking listening socket at `path` (a stale one is replaced), mode 0600."""
    unlink_quietly(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(1)
    sock.setblocking(False)
    return sock


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def close_all(fds: list) -> None:
    """Close and forget received fds: a second call on the same list closes nothing (fd
    numbers may already belong to someone else); None entries are skipped."""
    for fd in fds:
        if fd is None:
            continue
        try:
            os.close(fd)
        except OSError:
            pass
    del fds[:]
