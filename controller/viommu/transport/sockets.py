"""Unix sockets the backend listens on: created 0600, so only our user may connect (a peer
gets our guest-memory mappings and interrupt rights)."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable
from typing import Protocol


class Readers(Protocol):
    """Watches fds for readability: an asyncio loop, or a test's stand-in."""

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...


def listen_private_unix(path: str) -> socket.socket:
    """A non-blocking listening socket at `path`, mode 0600. A stale socket of ours there
    is replaced; anything else is refused (clear_stale_socket)."""
    clear_stale_socket(path)
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


def clear_stale_socket(path: str) -> None:
    """Make room for a socket at `path`: a socket of our user that nothing listens on is
    removed. Anything else there stays, and OSError says what it is: a file or directory
    (not a socket), someone else's socket, or one that is in use."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket; refusing "
                              "to replace it")
    if st.st_uid != os.getuid():
        raise PermissionError(errno.EPERM, f"{path} is a socket of uid {st.st_uid}, not ours; "
                              "refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        probe.connect(path)
    except ConnectionRefusedError:
        unlink_quietly(path)  # nothing listens: a stale socket, left by a process that died
        return
    except BlockingIOError:  # its backlog is full: something listens
        pass
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, f"{path} is a socket in use (something listens "
                          "on it); refusing to replace it")


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
