"""The backend's iommufd host edge: page fault groups read from a fault fd reach the page
request relay and are answered on the same fd, once; vEVENTQ events reach the event relay;
events the host lost are counted. Generated streams over socketpairs (no /dev/iommu here)."""

from __future__ import annotations

import socket
import struct

import pytest

from viommu.backend.backend import Backend
from viommu.events.smmuv3 import EventId, EventRecord
from viommu.transport.iommufd import (
    IOMMU_PGFAULT_FLAGS_LAST_PAGE,
    IOMMU_PGFAULT_PERM_WRITE,
    HwptPageResponse,
    HwptPgfault,
    VeventHeader,
)

EP, DEV_ID = 0x200, 7


class NoLoop:
    """The tests read the queues themselves: nothing watches their fds."""

    def add_reader(self, fd: int, callback) -> None:
        pass

    def remove_reader(self, fd: int) -> bool:
        return False


NO_LOOP = NoLoop()


@pytest.fixture
def backend(tmp_path) -> Backend:
    return Backend(str(tmp_path / "vu.sock"), None, [EP])


@pytest.fixture
def fault_fd(backend: Backend):
    ours, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    [queue] = backend.attach_iommufd(ours.fileno(), None, {DEV_ID: EP}, NO_LOOP)
    yield host, queue
    ours.close()
    host.close()


def group(cookie: int, pages: list[int]) -> bytes:
    return b"".join(
        HwptPgfault(IOMMU_PGFAULT_FLAGS_LAST_PAGE if i == len(pages) - 1 else 0, DEV_ID, 0,
                    3, IOMMU_PGFAULT_PERM_WRITE, page, cookie=cookie).encode()
        for i, page in enumerate(pages))


def test_a_host_fault_group_is_relayed_and_answered_invalid_once(backend, fault_fd) -> None:
    host, queue = fault_fd
    host.send(group(41, [0x10000, 0x11000]))
    queue.on_readable()
    assert backend.relay.pending == 2  # both requests wait for the guest as fault records
    assert HwptPageResponse.decode(host.recv(64)) == HwptPageResponse(41, 1)  # INVALID
    assert queue.pending() == []


def test_a_host_fault_group_resolved_by_the_controller_is_answered_success(
        backend, fault_fd) -> None:
    host, queue = fault_fd
    backend.page_requests.set_policy("host")
    host.send(group(42, [0x10000]))
    queue.on_readable()
    [pending] = backend.page_requests.pending.values()
    assert [r.sid for r in pending.requests] == [EP]
    backend.control.call("page-response", {"id": pending.group_id, "code": "success"})
    assert HwptPageResponse.decode(host.recv(64)) == HwptPageResponse(42, 0)


def test_veventq_events_reach_the_relay_and_host_losses_are_counted(backend) -> None:
    ours, host = socket.socketpair()
    [queue] = backend.attach_iommufd(None, ours.fileno(), {}, NO_LOOP)
    record = EventRecord(event_id=EventId.C_BAD_CD, sid=EP).encode()
    host.send(VeventHeader(0, 0).encode() + record + VeventHeader(0, 3).encode() + record)
    queue.on_readable()
    assert backend.relay.pending == 2
    assert backend.relay.counters()["upstream_lost"] == 2  # sequence 0 then 3: 1 and 2 lost
    assert struct.unpack_from("<I", record, 4)[0] == EP
    ours.close()
    host.close()
