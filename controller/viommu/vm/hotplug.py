"""Endpoints hot-plugged into a running VM (DMA engines and virtio-blk disks): served by the
backend over vfio-user, plugged into a root port with QMP device_add, and taken out again
with device_del."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from viommu.vm.disks import DiskSpec, block_device
from viommu.vm.errors import MachineError
from viommu.vm.viot import bdf

if TYPE_CHECKING:
    from viommu.vm.machine import Machine


@dataclasses.dataclass(frozen=True)
class HotpluggedEndpoint:
    """An endpoint plugged into a running VM (`Machine.add_endpoint`, `Machine.add_disk`)."""

    name: str  # QEMU device id
    endpoint_id: int  # = requester ID
    port: int
    disk: str | None = None  # a virtio-blk disk: the guest's block device (vda...)
    image: str | None = None  # and its image on the host

    @property
    def sysfs_name(self) -> str:
        rid = self.endpoint_id
        return f"0000:{rid >> 8:02x}:{rid >> 3 & 31:02x}.{rid & 7}"


def plug(vm: Machine, port: int, name: str | None, pri: bool, timeout: float,
         disk: DiskSpec | None = None) -> HotpluggedEndpoint:
    endpoint_id = bdf(vm.profile.port_bus(port), 0)
    if port in vm.unplugged_ports and not vm.platform.replug:
        raise MachineError(f"root port {port} of {vm.name} had a device unplugged since boot; "
                           f"on {vm.arch} a port takes one hot-plug per boot: use another port "
                           f"(free: {', '.join(map(str, vm.fresh_ports())) or 'none'}) or "
                           "reboot")
    name = name or f"{'disk' if disk else 'dma'}{port}"
    args = disk.create_args(vm, name) if disk else {"pri": pri}
    reply = vm.backend("endpoint-create", endpoint=endpoint_id, **args)
    vm.qmp("device_add", driver="vfio-user-pci", id=name, bus=f"rp{port}",
           socket={"type": "unix", "path": reply["socket"]})
    endpoint = HotpluggedEndpoint(name, endpoint_id, port, image=reply.get("image"))
    if disk:  # virtio_pci binds at once, then virtio_blk: the IOMMU group exists by then
        found: list[str] = []
        poll(f"the guest's virtio_blk to take {endpoint.sysfs_name}", timeout,
             lambda: found.append(block_device(vm, endpoint.sysfs_name) or "") or found[-1])
        return dataclasses.replace(endpoint, disk=found[-1])
    # Kernels that attach endpoints when the IOMMU registers give it an IOMMU group at once;
    # older ones only when a driver binds it (viommu.vm.guest_kernel).
    ready = "iommu_group" if vm.guest_kernel.attaches_at_registration else ""
    poll(f"the guest to enumerate {endpoint.sysfs_name}"
         f"{' into an IOMMU group' if ready else ''}", timeout,
         lambda: vm.run(f"test -e /sys/bus/pci/devices/{endpoint.sysfs_name}/{ready}"
                        ).status == 0)
    return endpoint


def unplug(vm: Machine, endpoint: HotpluggedEndpoint, timeout: float) -> None:
    vm.qmp("device_del", id=endpoint.name)
    poll(f"the guest to drop {endpoint.sysfs_name}", timeout,
         lambda: vm.run(f"test -e /sys/bus/pci/devices/{endpoint.sysfs_name}").status != 0)
    poll(f"QEMU to delete {endpoint.name}", timeout,
         lambda: endpoint.name not in _devices_behind_root_ports(vm))
    vm.backend("endpoint-delete", endpoint=endpoint.endpoint_id)
    vm.unplugged_ports.add(endpoint.port)


def _devices_behind_root_ports(vm: Machine) -> set[str | None]:
    return {d.get("qdev_id") for b in vm.qmp("query-pci") for p in b["devices"]
            for d in p.get("pci_bridge", {}).get("devices", [])}


def poll(what: str, timeout: float, probe: Callable[[], object]) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise MachineError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
