"""Recoverable faults end to end: a PRI-capable DMA endpoint in the running guest asks for
pages stage 1 does not map; the backend answers each group once, by policy: Success after a
host-side fill (the transfer completes), or Invalid Request after relaying (the transfer
fails and the guest prints the fault). Stop markers get neither a line nor a response.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from guest_dma import DST_IOVA, SRC_IOVA, TableArea, finish_dma, start_dma
from viommu.events.smmuv3 import EventId
from viommu.testing.pytest_plugin import plugged_endpoint
from viommu.vm.hotplug import HotpluggedEndpoint
from viommu.vm.machine import Machine

PORT = 3  # bus 4: endpoint 0x400
FILL_IOVA = DST_IOVA + 0x100000  # nothing maps it until the host-side fill


@pytest.fixture(scope="module")
def endpoint(viommu_vm: Machine) -> Iterator[HotpluggedEndpoint]:
    with plugged_endpoint(viommu_vm, PORT, name="dma-pri", pri=True, vfio=True) as ep:
        yield ep
        viommu_vm.backend("set-page-request-policy", policy="invalid")


def wait_for_group(guest: Machine, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = guest.backend("query-page-requests")["pending"]
        if pending:
            return pending[0]
        time.sleep(0.1)
    raise AssertionError("no page request group arrived")


def counters(guest: Machine) -> dict:
    return guest.backend("query-events", limit=0)["page_requests"]


def test_dma_on_non_present_pages_completes_after_a_host_side_fill(
        guest: Machine, endpoint: HotpluggedEndpoint) -> None:
    guest.backend("set-page-request-policy", policy="host")
    before = counters(guest)
    area = TableArea(guest)
    src_pages = [area.src] + [area.ram.alloc(4096) for _ in range(2)]
    for i, page in enumerate(src_pages[1:], 1):
        area.ram.write(page, bytes([i]) * 4096)
        area.tables.map(SRC_IOVA + i * 4096, page, ap_ro=True)
    dst_pages = [area.ram.alloc(4096) for _ in range(3)]  # not mapped yet
    area.upload()
    mark, doorbell = start_dma(guest, endpoint, SRC_IOVA, FILL_IOVA, 3 * 4096, "src=none",
                               "dst=none")
    guest.backend("attach-table", sid=endpoint.endpoint_id, ste0=area.ste()[0],
                  ste1=area.ste()[1])
    guest.run(f"touch {doorbell}")
    group = wait_for_group(guest)
    # One group for the three missing destination pages, answered once.
    assert [(r["address"], r["write"], r["last"]) for r in group["requests"]] == [
        (FILL_IOVA, True, False), (FILL_IOVA + 0x1000, True, False),
        (FILL_IOVA + 0x2000, True, True)]
    for i, page in enumerate(dst_pages):  # the host-side fill
        area.tables.map(FILL_IOVA + i * 4096, page)
    area.upload()
    guest.backend("page-response", id=group["id"], code="success")
    result = finish_dma(guest, mark)
    assert result["status"] == "done"
    copied = b"".join(bytes.fromhex(guest.backend("memory-read", gpa=p, size=4096)["data"])
                      for p in dst_pages)
    assert copied == b"".join(area.ram.read(page, 4096) for page in src_pages)
    after = counters(guest)
    assert (after["groups"] - before["groups"], after["requests"] - before["requests"]) == (1, 3)
    assert after["responses"].get("SUCCESS", 0) - before["responses"].get("SUCCESS", 0) == 1


def test_page_request_answered_invalid_fails_cleanly_with_the_guest_line(
        guest: Machine, endpoint: HotpluggedEndpoint) -> None:
    guest.backend("set-page-request-policy", policy="invalid")
    before = counters(guest)
    mark, doorbell = start_dma(guest, endpoint, 0x100000, 0x500000, 4096, "dst=none")
    guest.run(f"touch {doorbell}")
    result = finish_dma(guest, mark)
    assert (result["status"], int(result["error"], 0)) == ("error", EventId.F_TRANSLATION)
    guest.wait_line(rf"virtio_iommu virtio\d+: page fault from EP "
                    rf"{endpoint.endpoint_id} at 0x500000 \[W\]$", since=mark)
    after = counters(guest)
    assert after["responses"]["INVALID_REQUEST"] - \
        before["responses"].get("INVALID_REQUEST", 0) == 1


def test_stop_marker_produces_no_line_and_no_response(
        guest: Machine, endpoint: HotpluggedEndpoint) -> None:
    before = counters(guest)
    mark = guest.mark()
    guest.backend("inject-page-request", sid=endpoint.endpoint_id, address=0, pasid=4,
                  grpid=9, stop_marker=True)
    time.sleep(1)
    assert guest.fault_lines(mark) == []
    after = counters(guest)
    assert after["stop_markers"] == before["stop_markers"] + 1
    assert after["responses"] == before["responses"] and after["requests"] == before["requests"]


def test_counters_account_for_every_page_request(
        guest: Machine, endpoint: HotpluggedEndpoint) -> None:
    guest.backend("set-page-request-policy", policy="invalid")
    before = counters(guest)
    for grpid, last in ((20, False), (20, True), (21, True)):
        guest.backend("inject-page-request", sid=endpoint.endpoint_id,
                      address=0x900000 + grpid * 0x1000, grpid=grpid, last=last)
    after = counters(guest)
    assert after["requests"] - before["requests"] == 3
    assert after["groups"] - before["groups"] == 2
    answered = sum(after["responses"].values()) - sum(before["responses"].values())
    assert answered == 2 and after["pending_groups"] == 0
    events = guest.backend("query-events", limit=3)["trace"]
    assert [e["type"] for e in events] == ["PAGE_REQUEST"] * 3
    assert all(re.match(r"page fault from EP \d+ at 0x9", e["guest_line"]) for e in events)
