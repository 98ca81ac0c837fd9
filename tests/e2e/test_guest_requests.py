"""Real guest MAP/UNMAP: the guest tool binds the endpoint to vfio-pci and maps buffers with
VFIO, which the guest kernel turns into virtio-iommu ATTACH/MAP/UNMAP to our device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from viommu.machine import Machine

EP, BDF = 0x100, "0000:01:00.0"


@pytest.fixture
def vfio_endpoint(guest: Machine) -> Iterator[Machine]:
    guest.run(f"viommu-vfio bind {BDF}").check()
    yield guest
    # Back to how the session found it: no driver on the endpoint.
    guest.run(f"echo {BDF} > /sys/bus/pci/drivers/vfio-pci/unbind; "
              f"echo > /sys/bus/pci/devices/{BDF}/driver_override; rm -f /tmp/unmap-now")


def domain_of(guest: Machine, endpoint: int) -> dict:
    [domain] = [d for d in guest.backend("query-domains") if endpoint in d["endpoints"]]
    return domain


def test_guest_vfio_map_and_unmap_reach_the_backend_domain(vfio_endpoint: Machine) -> None:
    guest = vfio_endpoint
    mark = guest.mark()
    guest.console.send_line(f"viommu-vfio map {BDF} 0x200000 0x3000 --until /tmp/unmap-now &")
    guest.wait_line(r"viommu-vfio: mapped iova=0x200000 size=0x3000", since=mark)
    mappings = domain_of(guest, EP)["mappings"]
    assert [m["virt_start"] for m in mappings] == [0x200000, 0x201000, 0x202000]
    assert all(m["virt_end"] - m["virt_start"] == 0xFFF and m["flags"] == 3 for m in mappings)
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
