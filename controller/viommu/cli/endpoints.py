"""`viommu attach` and `detach`: DMA endpoints and virtio-blk disks hot-plugged into a
running VM, and kept in its state.json so that `detach` (and `state`) find them from
another process.

A hot-plug is recorded as soon as QEMU has the device, before anything that may fail after
(the guest's enumeration, binding it to vfio-pci), so a failed step never leaves a device
plugged that `detach` does not know. Neither command needs the guest's console to plug or
unplug; `attach` uses it to see the guest enumerate the device (and to bind it, with
--vfio), and when another client holds it, waits for it (--vfio) or says it did not look.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from viommu.cli.common import CliError, attached_vm, note, say
from viommu.cli.terminal import progress
from viommu.vm import hotplug, runs
from viommu.vm.disks import DEFAULT_DISK_SIZE, DiskSpec
from viommu.vm.errors import ConsoleBusy, MachineError
from viommu.vm.hotplug import HotpluggedEndpoint
from viommu.vm.machine import Machine

CONSOLE_WAIT_S = 60.0  # for another client to leave the console, when attach needs it


def cmd_attach(args: argparse.Namespace) -> int:
    disk = _disk(args)
    with attached_vm(args.name) as (vm, state, directory):
        check_port_free(vm, state, args.port)
        what = "a virtio-blk disk" if disk else "a DMA endpoint"
        with progress(f"hot-plugging {what} into port {args.port}"):
            endpoint = hotplug.plug_device(vm, args.port, args.id, args.pri, disk)
        state.endpoints.append(dataclasses.asdict(endpoint))
        state.save(directory)  # plugged: recorded, whatever happens next
        where = f"{endpoint.name}: endpoint {endpoint.endpoint_id:#x} at {endpoint.sysfs_name}"
        if not _console_for(vm, args.vfio, endpoint):
            say(f"{where}{' (PRI)' if args.pri else ''}, plugged; the guest's console is held "
                "by another client, so its enumeration was not checked (`lspci` there shows "
                f"it); `viommu detach {args.name} {endpoint.name}` removes it")
            return 0
        try:
            with progress(f"waiting for the guest to enumerate {endpoint.sysfs_name}"):
                endpoint = hotplug.wait_enumerated(vm, endpoint, timeout=30)
                if args.vfio:
                    vm.run(f"viommu-vfio bind {endpoint.sysfs_name}").check()
        except MachineError as exc:
            raise CliError(f"{endpoint.name} is plugged (and recorded: `viommu detach "
                           f"{args.name} {endpoint.name}` removes it), but {exc}") from None
        state.endpoints[-1] = dataclasses.asdict(endpoint)  # a disk: the guest's name for it
        state.save(directory)
    if disk:
        detail = f", the guest's /dev/{endpoint.disk}, image {endpoint.image}"
    else:
        detail = f"{' (PRI)' if args.pri else ''}{', bound to vfio-pci' if args.vfio else ''}"
    say(f"{where}{detail}; `viommu detach {args.name} {endpoint.name}` removes it")
    return 0


def _console_for(vm: Machine, needed: bool, endpoint: HotpluggedEndpoint) -> bool:
    """Whether the console is ours to use: free, or (when `needed`) free once another
    client leaves it; ConsoleBusy when it is needed and stays held."""
    if not vm.console_held():
        return True
    if not needed:
        return False
    note(f"waiting up to {CONSOLE_WAIT_S:g} s for the serial console, held by another client "
         "(leave `viommu console` with Ctrl-]), to bind the device to vfio-pci")
    if vm.wait_for_console(CONSOLE_WAIT_S):
        return True
    raise ConsoleBusy(f"{endpoint.name} is plugged (and recorded), not bound: the serial "
                      f"console stayed held; in the guest, `viommu-vfio bind "
                      f"{endpoint.sysfs_name}`, or `viommu detach {vm.name} {endpoint.name}`")


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
        with progress(f"unplugging {endpoint.name}"):
            vm.remove_endpoint(endpoint)  # QMP and the backend: no console needed
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
