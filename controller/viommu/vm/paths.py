"""Where the VM side finds what set-up provides: QEMU and the guest image come from the cache
(viommu.provision), the profiles from the package (viommu.qemu_configs)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from viommu.provision import DEFAULT_ARCH
from viommu.provision import guest_image as provision_guest_image
from viommu.provision.arch import get_arch
from viommu.provision.cache import SetupMissing
from viommu.provision.qemu import MIN_QEMU_VERSION, find_qemu, qemu_version

__all__ = ["MIN_QEMU_VERSION", "QEMU_CONFIGS", "SetupMissing", "guest_image", "qemu_binary",
           "qemu_version"]

QEMU_CONFIGS = Path(str(resources.files("viommu.qemu_configs")))


def qemu_binary(arch: str = DEFAULT_ARCH) -> str:
    return find_qemu(get_arch(arch))


def guest_image(arch: str = DEFAULT_ARCH, kernel: str | None = None) -> tuple[Path, Path, dict]:
    """(kernel image, initramfs, what they are), fetched and built on first use."""
    image = provision_guest_image(arch, kernel)
    manifest = json.loads((image.initramfs.parent / "manifest.json").read_text())
    return image.kernel.image, image.initramfs, manifest
