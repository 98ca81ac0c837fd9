"""What a queue service needs from its transport and from the device's health: two small
interfaces, so the services know nothing of vhost-user."""

from __future__ import annotations

from typing import Protocol

from viommu._dataplane import VirtQueue


class Ring(Protocol):
    """A started virtqueue as its transport hands it over: the ring in guest memory, the
    driver's kicks, and the two signals back to the driver."""

    vq: VirtQueue
    kick_fd: int | None
    call_fd: int | None  # where `notify` signals (a device thread may signal it itself)

    def notify(self) -> None:
        """Used-buffer notification (vhost-user: the call eventfd)."""
        ...

    def signal_error(self) -> bool:
        """Tell the front-end the ring failed; False when it gave no way to."""
        ...


class DeviceHealth(Protocol):
    """Whether the device still serves its rings (a driver that corrupted one breaks it)."""

    @property
    def broken(self) -> str | None: ...

    def ring_broken(self, why: str, ring: Ring) -> None:
        """Stop serving every ring until the guest resets the device."""
        ...
