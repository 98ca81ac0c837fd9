"""One virtqueue as the vhost-user front-end describes it: the ring in guest memory, its size,
addresses and base, and the kick, call and error eventfds (vhost-user.rst "Ring states")."""

from __future__ import annotations

import os

from viommu._dataplane import GuestMemory, VirtQueue
from viommu.transport.vhost_user import messages as m


class Vring:
    """Front-end-provided state of one virtqueue."""

    def __init__(self, mem: GuestMemory, index: int) -> None:
        self.vq = VirtQueue(mem, index)
        self.index = index
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.addr: m.VringAddr | None = None
        self.base = 0
        # base we answered in GET_VRING_BASE: a restart from another base, or with other
        # ring addresses, is a guest reset (QEMU sends no RESET_DEVICE for one).
        self.stopped_at: int | None = None
        self.running = False
        self.kick_watched = False  # the loop reads kick_fd (the device did not take it)

    def notify(self) -> None:
        """Used-buffer notification: the front-end's call eventfd."""
        if self.call_fd is not None:
            os.eventfd_write(self.call_fd, 1)

    def signal_error(self) -> bool:
        """Tell the front-end the vring failed (its SET_VRING_ERR eventfd). QEMU's generic
        device only logs this (and only in debug builds): no vhost-user message makes it set
        DEVICE_NEEDS_RESET for the guest. False when no error fd was given."""
        if self.err_fd is None:
            return False
        os.eventfd_write(self.err_fd, 1)
        return True

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
