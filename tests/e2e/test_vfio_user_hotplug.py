"""End to end: QEMU's vfio-user-pci hot-plugs our DMA endpoint (served from a thread of this
process) behind a root port; the guest enumerates it, virtio-iommu puts it in an IOMMU group
(PROBE/ATTACH reach the backend), its BAR answers through QEMU, and device_del removes it.

Its own guest, not the shared session one: the extra endpoint would change what the other
e2e tests see in query-endpoints. q35 hot-plugs root ports through ACPI by default, so an
unplug completes without pciehp's 5-second attention-button wait.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from viommu.endpoints import dma_engine as ep
from viommu.endpoints.dma_engine import DmaEndpoint
from viommu.transport.vfio_user.server import EndpointServer
from viommu.vm.machine import Machine

EP = 0x200  # rp1's secondary bus is 2: requester ID 02:00.0
SYSFS = "/sys/bus/pci/devices/0000:02:00.0"


def wait_for(what: str, probe: Callable[[], object], timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    machine = Machine("default", workdir=tmp_path_factory.mktemp("vfio-user-vm"),
                      name="vfio-user")
    machine.launch()
    machine.backend("add-endpoint", endpoint=EP)
    yield machine
    machine.shutdown()


@pytest.fixture(scope="module")
def server() -> Iterator[EndpointServer]:
    sockdir = Path(tempfile.mkdtemp(prefix="viommu-vu-"))  # unix socket paths stay short
    srv = EndpointServer(str(sockdir / "dma1.sock"), DmaEndpoint(), name="dma1")
    srv.start_in_thread()
    yield srv
    srv.stop()
    shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture(scope="module")
def plugged(vm: Machine, server: EndpointServer) -> Iterator[Machine]:
    """dma1 plugged into rp1 once for the module (a port of virt's takes one hot-plug per
    boot: viommu.vm.platforms) and enumerated by the guest; the last test unplugs it, and
    the fixture does if a failure left it in."""
    vm.qmp("device_add", driver="vfio-user-pci", id="dma1", bus="rp1",
           socket={"type": "unix", "path": server.socket_path})
    if not vm.guest_kernel.attaches_at_registration:  # 6.12: attached at driver bind
        wait_for("the guest to enumerate 02:00.0", lambda: vm.run(f"test -e {SYSFS}").status == 0)
        vm.run("viommu-vfio bind 0000:02:00.0").check()
    wait_for("the guest to enumerate 02:00.0 into an IOMMU group",
             lambda: vm.run(f"test -e {SYSFS}/iommu_group").status == 0)
    yield vm
    if server.connected:
        unplug(vm, server)


def unplug(vm: Machine, server: EndpointServer) -> None:
    vm.qmp("device_del", id="dma1")
    wait_for("the guest to drop 02:00.0", lambda: vm.run(f"test -e {SYSFS}").status != 0)
    wait_for("QEMU to close the vfio-user socket", lambda: not server.connected)


def test_hot_plugged_endpoint_has_our_ids_and_an_iommu_group(plugged: Machine) -> None:
    ids = plugged.run(f"cat {SYSFS}/vendor {SYSFS}/device").check().output.split()
    group = plugged.run(f"ls {SYSFS}/iommu_group/devices").check().output.split()
    assert (ids, group) == (["0x1b36", "0x00f0"], ["0000:02:00.0"])


def test_backend_saw_probe_then_attach_for_the_endpoint(plugged: Machine) -> None:
    trace = plugged.backend("query-requests", limit=1000)["trace"]
    mine = [(e["type"], e["status"]) for e in trace if e.get("endpoint") == EP]
    assert mine[:2] == [("PROBE", "S_OK"), ("ATTACH", "S_OK")]


def test_bar0_id_register_reads_through_qemu(plugged: Machine) -> None:
    bar0 = int(plugged.run(f"head -1 {SYSFS}/resource").check().output.split()[0], 16)
    # No driver is bound, so memory decoding is still off: turn it on in PCI_COMMAND.
    plugged.run(f"printf '\\002' | dd of={SYSFS}/config bs=1 seek=4 conv=notrunc "
                "2>/dev/null").check()
    value = plugged.run(f"devmem {bar0:#x} 32").check().output.strip()
    assert int(value, 16) == ep.ID_VALUE


def test_qemu_sends_version_first_then_maps_guest_ram_with_fds(
        plugged: Machine, server: EndpointServer) -> None:
    # Connection state belongs to the server's thread: read it there.
    history, writable = server.call(lambda c: (list(c.history), [
        r.address for r in c.memory if r.writable]), server.connection)
    assert history[:2] == ["VERSION", "DMA_MAP"] and writable


def test_device_del_removes_the_endpoint_and_closes_the_connection(
        plugged: Machine, server: EndpointServer) -> None:
    disconnects = server.disconnects
    unplug(plugged, server)
    assert server.disconnects == disconnects + 1
    assert plugged.run("ls /sys/bus/pci/devices").check().output.split().count(
        "0000:02:00.0") == 0
