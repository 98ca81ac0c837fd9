"""DMA endpoints hot-plugged into a running VM: served by the backend over vfio-user, plugged
into a root port with QMP device_add, and taken out again with device_del."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from viommu.vm.errors import MachineError
from viommu.vm.viot import bdf

if TYPE_CHECKING:
    from viommu.vm.machine import Machine


@dataclasses.dataclass(frozen=True)
class HotpluggedEndpoint:
    """A DMA endpoint plugged into a running VM (`Machine.add_endpoint`)."""

    name: str  # QEMU device id
    endpoint_id: int  # = requester ID
    port: int

    @property
    def sysfs_name(self) -> str:
        rid = self.endpoint_id
        return f"0000:{rid >> 8:02x}:{rid >> 3 & 31:02x}.{rid & 7}"


def plug(vm: Machine, port: int, name: str | None, pri: bool,
         timeout: float) -> HotpluggedEndpoint:
    endpoint_id = bdf(vm.profile.port_bus(port), 0)
    name = name or f"dma{port}"
    sock = vm.backend("endpoint-create", endpoint=endpoint_id, pri=pri)["socket"]
    vm.qmp("device_add", driver="vfio-user-pci", id=name, bus=f"rp{port}",
           socket={"type": "unix", "path": sock})
    endpoint = HotpluggedEndpoint(name, endpoint_id, port)
    poll(f"the guest to put {endpoint.sysfs_name} in an IOMMU group", timeout,
         lambda: vm.run(f"test -e /sys/bus/pci/devices/{endpoint.sysfs_name}/iommu_group"
                        ).status == 0)
    return endpoint


def unplug(vm: Machine, endpoint: HotpluggedEndpoint, timeout: float) -> None:
    vm.qmp("device_del", id=endpoint.name)
    poll(f"the guest to drop {endpoint.sysfs_name}", timeout,
         lambda: vm.run(f"test -e /sys/bus/pci/devices/{endpoint.sysfs_name}").status != 0)
    poll(f"QEMU to delete {endpoint.name}", timeout,
         lambda: endpoint.name not in _devices_behind_root_ports(vm))
    vm.backend("endpoint-delete", endpoint=endpoint.endpoint_id)


def _devices_behind_root_ports(vm: Machine) -> set[str | None]:
    return {d.get("qdev_id") for b in vm.qmp("query-pci") for p in b["devices"]
            for d in p.get("pci_bridge", {}).get("devices", [])}


def poll(what: str, timeout: float, probe: Callable[[], object]) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise MachineError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
