"""`viommu attach` and `detach`: DMA endpoints hot-plugged into a running VM, and kept in
its state.json so that `detach` (and `state`) find them from another process."""

from __future__ import annotations

import argparse
import dataclasses

from viommu.cli.common import CliError, attached_vm, say
from viommu.cli.terminal import progress
from viommu.vm import runs
from viommu.vm.hotplug import HotpluggedEndpoint
from viommu.vm.machine import Machine


def cmd_attach(args: argparse.Namespace) -> int:
    with attached_vm(args.name) as (vm, state, directory):
        check_port_free(vm, state, args.port)
        with progress(f"hot-plugging a DMA endpoint into port {args.port}"):
            endpoint = vm.add_endpoint(args.port, args.id, pri=args.pri)
            if args.vfio:
                vm.run(f"viommu-vfio bind {endpoint.sysfs_name}").check()
    state.endpoints.append(dataclasses.asdict(endpoint))
    state.save(directory)
    say(f"{endpoint.name}: endpoint {endpoint.endpoint_id:#x} at {endpoint.sysfs_name}"
        f"{' (PRI)' if args.pri else ''}{', bound to vfio-pci' if args.vfio else ''}; "
        f"`viommu detach {args.name} {endpoint.name}` removes it")
    return 0


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

