"""`viommu attach` and `detach`: DMA endpoints and virtio-blk disks hot-plugged into a
running VM, and kept in its state.json so that `detach` (and `state`) find them from
another process."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from viommu.cli.common import CliError, attached_vm, say
from viommu.cli.terminal import progress
from viommu.vm import runs
from viommu.vm.disks import DEFAULT_DISK_SIZE, DiskSpec
from viommu.vm.hotplug import HotpluggedEndpoint
from viommu.vm.machine import Machine


def cmd_attach(args: argparse.Namespace) -> int:
    disk = _disk(args)
    with attached_vm(args.name) as (vm, state, directory):
        check_port_free(vm, state, args.port)
        what = "a virtio-blk disk" if disk else "a DMA endpoint"
        with progress(f"hot-plugging {what} into port {args.port}"):
            if disk:
                endpoint = vm.add_disk(args.port, disk, args.id)
            else:
                endpoint = vm.add_endpoint(args.port, args.id, pri=args.pri)
            if args.vfio:
                vm.run(f"viommu-vfio bind {endpoint.sysfs_name}").check()
    state.endpoints.append(dataclasses.asdict(endpoint))
    state.save(directory)
    if disk:
        detail = f", the guest's /dev/{endpoint.disk}, image {endpoint.image}"
    else:
        detail = f"{' (PRI)' if args.pri else ''}{', bound to vfio-pci' if args.vfio else ''}"
    say(f"{endpoint.name}: endpoint {endpoint.endpoint_id:#x} at {endpoint.sysfs_name}{detail}; "
        f"`viommu detach {args.name} {endpoint.name}` removes it")
    return 0


def _disk(args: argparse.Namespace) -> DiskSpec | None:
    blk_only = [flag for flag, given in (("--image", args.image), ("--size", args.size),
                                         ("--read-only", args.read_only)) if given]
    if not args.blk:
        if blk_only:
            raise CliError(f"{', '.join(blk_only)}: only with --blk")
        return None
    if args.pri or args.vfio:
        raise CliError("--pri and --vfio are for DMA endpoints, not --blk disks")
    image = str(Path(args.image).resolve()) if args.image else None
    return DiskSpec(image=image, size=args.size or DEFAULT_DISK_SIZE, read_only=args.read_only)


def check_port_free(vm: Machine, state: runs.RunState, port: int) -> None:
    taken = {ep.port: ep.name for ep in vm.profile.endpoints}
    taken |= {e["port"]: e["name"] for e in state.endpoints}
    free = [p for p in range(vm.profile.root_ports) if p not in taken]
    if port in taken or port not in range(vm.profile.root_ports):
        why = f"is taken by {taken[port]}" if port in taken else "does not exist"
        raise CliError(f"root port {port} {why}; free ports: "
                       f"{', '.join(map(str, free)) or 'none (detach one first)'}")


def cmd_detach(args: argparse.Namespace) -> int:
    with attached_vm(args.name) as (vm, state, directory):
        spec = _find_endpoint(state, args.endpoint)
        endpoint = HotpluggedEndpoint(**spec)
        bound = f"/sys/bus/pci/drivers/vfio-pci/{endpoint.sysfs_name}"
        with progress(f"unplugging {endpoint.name}"):
            vm.run(f"test -e {bound} && echo {endpoint.sysfs_name} > "
                   "/sys/bus/pci/drivers/vfio-pci/unbind")
            vm.remove_endpoint(endpoint)
    state.endpoints.remove(spec)
    state.save(directory)
    say(f"{endpoint.name} (endpoint {endpoint.endpoint_id:#x}) removed")
    return 0


def _find_endpoint(state: runs.RunState, wanted: str) -> dict:
    for spec in state.endpoints:
        if wanted == spec["name"] or _maybe_int(wanted) == spec["endpoint_id"]:
            return spec
    known = ", ".join(f"{e['name']} ({e['endpoint_id']:#x})" for e in state.endpoints)
    raise CliError(f"{state.name} has no hot-plugged endpoint {wanted!r}; "
                   f"{'known: ' + known if known else 'attach one with `viommu attach`'}")


def _maybe_int(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None

