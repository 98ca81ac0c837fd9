"""Real guest MAP/UNMAP: the guest tool binds the endpoint to vfio-pci and maps buffers with
VFIO, which the guest kernel turns into virtio-iommu ATTACH/MAP/UNMAP to our device."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise

import pytest

from viommu.vm.machine import Machine

EP, BDF = 0x100, "0000:01:00.0"


@pytest.fixture
def vfio_endpoint(guest: Machine) -> Iterator[Machine]:
    guest.run(f"viommu-vfio bind {BDF}").check()
    yield guest
    # Back to how the session found it: no driver on the endpoint.
    guest.run(f"echo {BDF} > /sys/bus/pci/drivers/vfio-pci/unbind; "
              f"echo > /sys/bus/pci/devices/{BDF}/driver_override; rm -f /tmp/unmap-now")


LOOP_IOVA = 0x100000  # where `viommu-vfio maplat` maps and unmaps


def domain_of(guest: Machine, endpoint: int) -> dict:
    [domain] = [d for d in guest.backend("query-domains") if endpoint in d["endpoints"]]
    return domain


def test_guest_vfio_map_and_unmap_reach_the_backend_domain(vfio_endpoint: Machine) -> None:
    guest = vfio_endpoint
    mark = guest.mark()
    guest.console.send_line(f"viommu-vfio map {BDF} 0x200000 0x3000 --until /tmp/unmap-now &")
    guest.wait_line(r"viommu-vfio: mapped iova=0x200000 size=0x3000", since=mark)
    mappings = domain_of(guest, EP)["mappings"]
    # Page sizes are Linux's choice (every 4 KiB multiple is offered, so physically
    # contiguous pages may come as one MAP): the mappings tile the range exactly.
    assert mappings[0]["virt_start"] == 0x200000 and mappings[-1]["virt_end"] == 0x202FFF
    assert all(a["virt_end"] + 1 == b["virt_start"] for a, b in pairwise(mappings))
    assert all(m["flags"] == 3 for m in mappings)
    guest.run("touch /tmp/unmap-now; wait").check()
    assert domain_of(guest, EP)["mappings"] == []


def test_read_only_vfio_mapping_arrives_without_the_write_flag(vfio_endpoint: Machine) -> None:
    guest = vfio_endpoint
    mark = guest.mark()
    guest.console.send_line(f"viommu-vfio map {BDF} 0x400000 0x1000 ro --until /tmp/unmap-now &")
    guest.wait_line(r"viommu-vfio: mapped iova=0x400000", since=mark)
    [mapping] = domain_of(guest, EP)["mappings"]
    assert mapping["flags"] == 1  # VIRTIO_IOMMU_MAP_F_READ only
    guest.run("touch /tmp/unmap-now; wait").check()


def test_every_guest_request_got_a_status(vfio_endpoint: Machine) -> None:
    guest = vfio_endpoint
    guest.run(f"viommu-vfio maplat {BDF} 50").check()
    requests = guest.backend("query-requests", limit=0)
    assert requests["counts"]["MAP"] >= 50 and requests["counts"]["UNMAP"] >= 50
    assert set(requests["status"]) == {"S_OK"}


def test_guest_maps_are_served_by_the_request_thread_and_traced_in_order(
        vfio_endpoint: Machine) -> None:
    guest = vfio_endpoint
    before = guest.backend("query-status")["request_thread"]
    seq = guest.backend("query-requests", limit=1)["trace"][-1]["seq"]
    guest.run(f"viommu-vfio maplat {BDF} 200").check()
    after = guest.backend("query-status")["request_thread"]
    served = after["served_by_thread"] - before["served_by_thread"]
    since = guest.backend("query-requests", since=seq, limit=10_000)["trace"]
    maps = [e for e in since if e["type"] in ("MAP", "UNMAP")]
    # The loop's 200 MAP/UNMAP pairs at its IOVA; 6.12's VFIO also maps and unmaps 8 KiB at
    # IOVA 0 as it attaches the container (vfio_iommu_type1's superpage probe).
    assert len([e for e in maps if e["virt_start"] == LOOP_IOVA]) == 400
    assert served == len(maps)  # every MAP and UNMAP (the tool's ATTACHes go to Python)
    trace = guest.backend("query-requests", limit=20)["trace"]
    # The loop's tail, then the tool's ATTACHes back to the default domain as it exits.
    assert [e["type"] for e in trace][-6:] == ["MAP", "UNMAP", "MAP", "UNMAP", "ATTACH",
                                               "ATTACH"]
    assert [e["seq"] for e in trace] == list(range(trace[0]["seq"], trace[0]["seq"] + 20))
