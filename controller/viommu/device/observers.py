"""The named interfaces through which the device tells others about its state.

The device is the source of truth for domains, attachments and page-table bindings; what
follows it (the translation engine's streams, the request thread's list of MAP domains,
page-request bookkeeping) registers a `DeviceObserver` and overrides what it follows. The
device never reaches into them, and they never change the device's state behind its back.
"""

from __future__ import annotations

from typing import Protocol

from viommu.uapi import PageRespCode


class DeviceObserver:
    """Follows the device; every method is a no-op unless overridden."""

    def stream_changed(self, endpoint_id: int) -> None:
        """The endpoint's translation changed: attached, detached, bound, reset."""

    def translations_invalidated(self, endpoint_id: int, iova: int, size: int) -> None:
        """The guest asked to drop cached translations of the stream ([iova, iova+size),
        size 0: all of them)."""

    def map_domains_changed(self) -> None:
        """A MAP/UNMAP domain came or went."""

    def pasid_unbound(self, endpoint_id: int, pasid: int | None) -> None:
        """A PASID of the stream (None: every PASID) is no longer bound: whatever is still
        in flight for it is stale."""


class PageResponder(Protocol):
    """Who waits for the guest's answers to page request groups (PAGE_RESP)."""

    def guest_response(self, endpoint_id: int, pasid: int | None, grpid: int,
                       code: PageRespCode) -> bool:
        """Answer the group; False when no such group is waiting."""
        ...
