"""virtio-blk disks the backend serves over vfio-user (viommu.endpoints.virtio_blk), as a
Machine uses them: cold-plugged from the profile's endpoints (`device = "viommu-blk"`) or
hot-plugged into a running VM (`Machine.add_disk`), each backed by a raw image (by default
in the VM's work directory, created sparse).

A profile disk:

    [[endpoints]]
    name = "disk0"
    port = 1
    device = "viommu-blk"
    options = { size = "256M", image = "disk0.img", read-only = false, msix = true }
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from viommu.provision.qemu import qemu_version

if TYPE_CHECKING:
    from viommu.vm.machine import Machine
    from viommu.vm.profile import EndpointSpec, Profile

DISK_DEVICE = "viommu-blk"
DEFAULT_DISK_SIZE = 64 << 20
_OPTIONS = {"image", "size", "read-only", "indirect", "msix"}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes of "256M", "1G", "4096" (K, M, G, T are powers of 1024)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if not match:
        raise ValueError(f"a size is a number with an optional K, M, G or T, not {text!r}")
    return int(match[1]) * _UNITS[match[2].upper()]


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    """How the backend serves a disk: its image (None: disk-NAME.img in the VM's work
    directory), the size of a new image, read-only, indirect descriptors offered, and
    interrupts by MSI-X or INTx (None: MSI-X where QEMU can unplug it, see
    `msix_unplugs_safely`)."""

    image: str | None = None
    size: int = DEFAULT_DISK_SIZE
    read_only: bool = False
    indirect: bool = True
    msix: bool | None = None

    @classmethod
    def from_options(cls, options: dict) -> DiskSpec:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown {DISK_DEVICE} options {sorted(unknown)} "
                             f"(known: {sorted(_OPTIONS)})")
        return cls(image=options.get("image"), size=parse_size(options.get("size",
                                                                            DEFAULT_DISK_SIZE)),
                   read_only=bool(options.get("read-only", False)),
                   indirect=bool(options.get("indirect", True)), msix=options.get("msix"))

    def create_args(self, vm: Machine, name: str) -> dict:
        """endpoint-create's arguments for this disk in `vm`."""
        workdir = vm.workdir
        image = Path(self.image).expanduser() if self.image else workdir / f"disk-{name}.img"
        if not image.is_absolute():
            image = workdir / image
        msix = self.msix if self.msix is not None else msix_unplugs_safely(vm.prepare().qemu)
        return {"kind": "blk", "image": str(image), "size": self.size,
                "read_only": self.read_only, "indirect": self.indirect, "msix": msix}


@functools.lru_cache
def msix_unplugs_safely(qemu: str) -> bool:
    """Whether this QEMU survives unplugging a vfio-user device with MSI-X. Up to 11.1 it
    aborts in vfio_user_msix_teardown (memory_region_del_subregion's assertion; seen with
    Debian's 11.0.2 and 11.1.3), fixed by the patch "vfio-user: Do not delete the
    subregion" on qemu-devel."""
    version = qemu_version(qemu)
    return version is not None and version >= (11, 2)


def endpoint_socket(socket_dir: Path | str, endpoint_id: int) -> str:
    """Where the backend serves a cold-plugged endpoint (QEMU connects at start-up)."""
    return os.path.join(socket_dir, f"endpoint-{endpoint_id:x}.sock")


def profile_disks(profile: Profile) -> list[EndpointSpec]:
    return [ep for ep in profile.endpoints if ep.device == DISK_DEVICE]


def serve_profile_disks(vm: Machine, socket_dir: Path | str) -> None:
    """Before QEMU starts: the backend serves each disk of the profile, so QEMU's
    vfio-user-pci finds its socket when it realizes the device."""
    for spec in profile_disks(vm.profile):
        endpoint_id = vm.profile.endpoint_id(spec)
        vm.backend("endpoint-create", endpoint=endpoint_id,
                   socket=endpoint_socket(socket_dir, endpoint_id),
                   **DiskSpec.from_options(spec.options).create_args(vm, spec.name))


def qemu_device(spec: EndpointSpec, bus: str, socket_dir: Path | str,
                endpoint_id: int) -> list[str]:
    """QEMU's vfio-user-pci for a profile disk (JSON: its socket is a structure)."""
    return ["-device", json.dumps({"driver": "vfio-user-pci", "id": spec.name, "bus": bus,
                                   "socket": {"type": "unix",
                                              "path": endpoint_socket(socket_dir,
                                                                      endpoint_id)}})]


def block_device(vm: Machine, sysfs_name: str) -> str | None:
    """The guest's name of the disk at `sysfs_name` (vda...), once virtio_blk has it."""
    out = vm.run(f"ls /sys/bus/pci/devices/{sysfs_name}/virtio*/block 2>/dev/null").output
    names = out.split()
    return names[0] if names else None
