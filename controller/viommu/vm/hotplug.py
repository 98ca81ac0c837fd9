"""Endpoints hot-plugged into a running VM (DMA engines and virtio-blk disks): served by the
backend over vfio-user, plugged into a root port with QMP device_add, and taken out again
with device_del.

A step that fails leaves nothing half done: a device_add that fails undoes the backend's
endpoint-create. Plugging is QMP and the backend only; seeing the guest enumerate the device
takes the console (`wait_enumerated`), and unplugging does not: QEMU deletes the device once
the guest has let go of it (it powered the slot off), which is what `unplug` waits for."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from viommu.vm.disks import DiskSpec, block_device
from viommu.vm.errors import MachineError
from viommu.vm.viot import bdf

if TYPE_CHECKING:
    from viommu.vm.machine import Machine

T = TypeVar("T")

@dataclasses.dataclass(frozen=True)
class HotpluggedEndpoint:
    """An endpoint plugged into a running VM (`Machine.add_endpoint`, `Machine.add_disk`)."""

    name: str  # QEMU device id
    endpoint_id: int  # = requester ID
    port: int
    disk: str | None = None  # a virtio-blk disk: the guest's block device (vda...; "" until seen)
    image: str | None = None  # and its image on the host

    @property
    def sysfs_name(self) -> str:
        rid = self.endpoint_id
        return f"0000:{rid >> 8:02x}:{rid >> 3 & 31:02x}.{rid & 7}"


def plug(vm: Machine, port: int, name: str | None, pri: bool, timeout: float,
         disk: DiskSpec | None = None) -> HotpluggedEndpoint:
    return wait_enumerated(vm, plug_device(vm, port, name, pri, disk), timeout)


def plug_device(vm: Machine, port: int, name: str | None, pri: bool,
                disk: DiskSpec | None = None) -> HotpluggedEndpoint:
    """Serve the endpoint (a DMA engine, or `disk`) and plug it (QMP device_add); the guest
    enumerates it after (`wait_enumerated`)."""
    endpoint_id = bdf(vm.profile.port_bus(port), 0)
    if port_spent(vm, port):
        raise MachineError(f"root port {port} of {vm.name} had a device unplugged since boot; "
                           f"on {vm.arch} a port takes one hot-plug per boot: use another port "
                           f"(free: {', '.join(map(str, vm.fresh_ports())) or 'none'}) or "
                           "reboot")
    name = name or f"{'disk' if disk else 'dma'}{port}"
    args = disk.create_args(vm, name) if disk else {"pri": pri}
    reply = vm.backend("endpoint-create", endpoint=endpoint_id, **args)
    try:
        vm.qmp("device_add", driver="vfio-user-pci", id=name, bus=f"rp{port}",
               socket={"type": "unix", "path": reply["socket"]})
    except BaseException:
        vm.backend("endpoint-delete", endpoint=endpoint_id)  # as it was: nothing served
        raise
    return HotpluggedEndpoint(name, endpoint_id, port, image=reply.get("image"),
                              disk="" if disk else None)


def wait_enumerated(vm: Machine, endpoint: HotpluggedEndpoint,
                    timeout: float) -> HotpluggedEndpoint:
    """Until the guest has the device: a disk, its block device (the endpoint returned names
    it); else in an IOMMU group, where the kernel attaches endpoints as the IOMMU registers
    (older ones do when a driver binds it: viommu.vm.guest_kernel). Takes the console."""
    if endpoint.disk is not None:
        # virtio_pci binds at once, then virtio_blk: the IOMMU group exists by then
        disk = poll(f"the guest's virtio_blk to take {endpoint.sysfs_name}", timeout,
                    lambda: block_device(vm, endpoint.sysfs_name))
        return dataclasses.replace(endpoint, disk=disk)
    ready = "iommu_group" if vm.guest_kernel.attaches_at_registration else ""
    poll(f"the guest to enumerate {endpoint.sysfs_name}"
         f"{' into an IOMMU group' if ready else ''}", timeout,
         lambda: vm.run(f"test -e /sys/bus/pci/devices/{endpoint.sysfs_name}/{ready}"
                        ).status == 0)
    return endpoint


def unplug(vm: Machine, endpoint: HotpluggedEndpoint, timeout: float) -> None:
    """device_del, then until QEMU has deleted the device (the guest had let go of it: its
    driver unbound, the slot powered off), then the backend stops serving it."""
    try:
        vm.qmp("device_del", id=endpoint.name)
    except MachineError:
        if endpoint.name in _devices_behind_root_ports(vm):
            raise
        # gone already (a device_del before this one completed): only the rest is left
    poll(f"QEMU to delete {endpoint.name} (the guest lets go of it first)", timeout,
         lambda: endpoint.name not in _devices_behind_root_ports(vm))
    try:
        vm.backend("endpoint-delete", endpoint=endpoint.endpoint_id)
    except MachineError as exc:
        if "is not served here" not in str(exc):  # else: deleted before, by an earlier try
            raise
    vm.unplugged_ports.add(endpoint.port)


def _devices_behind_root_ports(vm: Machine) -> set[str | None]:
    return {d.get("qdev_id") for b in vm.qmp("query-pci") for p in b["devices"]
            for d in p.get("pci_bridge", {}).get("devices", [])}


def port_spent(vm: Machine, port: int) -> bool:
    """Whether root port `port` has had its one hot-plug of this boot, on a platform whose
    ports take one (viommu.vm.platforms: `replug`)."""
    return port in vm.unplugged_ports and not vm.platform.replug


def poll(what: str, timeout: float, probe: Callable[[], T | None]) -> T:
    """What `probe` returns once it is true."""
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        if time.monotonic() > deadline:
            raise MachineError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
    return found
