"""What a guest kernel's configuration must have for viommu, checked before any boot.

The configuration is read from the kernel's .config (a build tree), Debian's config-<release>,
or the image itself when it embeds it (CONFIG_IKCONFIG; Linux scripts/extract-ikconfig).
Options are `=y`, or `=m` with the module present. `fragment()` prints what to merge into a
developer's .config (Linux scripts/kconfig/merge_config.sh), as `vng --kconfig` does.
"""

from __future__ import annotations

import dataclasses
import lzma
import re
import zlib
from pathlib import Path

from viommu.provision.kernels import Kernel

_IKCONFIG_MARK = b"IKCFG_ST\037\213\010"


def _zstd():
    import zstandard  # optional: only for zstd-compressed images that embed IKCONFIG

    return zstandard.ZstdDecompressor().decompressobj()


# Payload magic of a compressed kernel image, and a decompressor for one stream of it.
_COMPRESSED = (
    (b"\037\213\010", lambda: zlib.decompressobj(wbits=31)),
    (b"\3757zXZ\0", lzma.LZMADecompressor),
    (b"\x28\xb5\x2f\xfd", _zstd),
)


@dataclasses.dataclass(frozen=True)
class Requirement:
    option: str  # without CONFIG_
    why: str
    feature: str | None = None  # None: every VM needs it; else only this feature
    arches: tuple[str, ...] = ("x86_64", "aarch64")


REQUIREMENTS = (
    Requirement("PCI", "the vIOMMU and its endpoints are PCI functions"),
    Requirement("VIRTIO_PCI", "the vIOMMU is a virtio-pci device"),
    Requirement("VIRTIO_IOMMU", "the guest's virtio-iommu driver"),
    Requirement("ACPI_VIOT", "the VIOT table tells the driver which endpoints it translates",
                arches=("x86_64",)),
    Requirement("OF", "the device tree tells the driver which endpoints it translates",
                arches=("aarch64",)),
    Requirement("PCI_HOST_GENERIC", "the virt machine's PCIe host bridge",
                arches=("aarch64",)),
    Requirement("SERIAL_8250_CONSOLE", "the serial console the controller drives",
                arches=("x86_64",)),
    Requirement("SERIAL_AMBA_PL011_CONSOLE", "the serial console the controller drives",
                arches=("aarch64",)),
    Requirement("BLK_DEV_INITRD", "the guest runs from viommu's initramfs"),
    Requirement("DEVTMPFS", "the initramfs mounts /dev as devtmpfs"),
    Requirement("PCIEPORTBUS", "endpoints sit behind PCIe root ports", "hot-plug"),
    Requirement("HOTPLUG_PCI_PCIE", "endpoints are hot-plugged into root ports", "hot-plug"),
    Requirement("VFIO", "DMA endpoints are driven from the guest through VFIO", "vfio"),
    Requirement("VFIO_IOMMU_TYPE1", "VFIO's container maps through the vIOMMU", "vfio"),
    Requirement("VFIO_PCI", "DMA endpoints bind to vfio-pci", "vfio"),
    Requirement("VIRTIO_BLK", "the virtio-blk endpoint's guest driver", "virtio-blk"),
    Requirement("VFAT_FS", "the filesystem test on the virtio-blk endpoint's disk",
                "virtio-blk"),
    Requirement("VIRTIO_NET", "the NIC of profiles with a [network] table", "network"),
)
FEATURES = sorted({r.feature for r in REQUIREMENTS if r.feature})


def requirements(arch: str, features: list[str] | None = None) -> list[Requirement]:
    """What `arch` needs; with `features` None, every feature's needs too."""
    return [r for r in REQUIREMENTS if arch in r.arches
            and (r.feature is None or features is None or r.feature in features)]


def read_config(kernel: Kernel) -> dict[str, str] | None:
    """CONFIG_* values (without the prefix); None when the kernel's configuration cannot be
    found (no .config beside it and no IKCONFIG in the image)."""
    if kernel.config is not None:
        return parse_config(kernel.config.read_text(errors="replace"))
    text = ikconfig(kernel.image)
    return parse_config(text) if text is not None else None


def parse_config(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        match = re.match(r"CONFIG_(\w+)=(.*)", line)
        if match:
            values[match[1]] = match[2].strip('"')
    return values


def ikconfig(image: Path) -> str | None:
    """The configuration a kernel image embeds (CONFIG_IKCONFIG), searching the image and,
    for a compressed image, its decompressed payload (Linux scripts/extract-ikconfig)."""
    data = image.read_bytes()
    found = _find_ikconfig(data)
    for magic, decompressor in _COMPRESSED:
        start = data.find(magic)
        if found is not None or start < 0:
            continue
        try:
            found = _find_ikconfig(decompressor().decompress(data[start:]))
        except (ImportError, OSError, EOFError, lzma.LZMAError, zlib.error, ValueError):
            continue
    return found


def _find_ikconfig(data: bytes) -> str | None:
    start = data.find(_IKCONFIG_MARK)
    if start < 0:
        return None
    try:  # the gzip stream ends before IKCFG_ED; what trails it is not part of it
        return zlib.decompressobj(wbits=31).decompress(data[start + 8:]).decode(errors="replace")
    except zlib.error:
        return None


def missing(kernel: Kernel, config: dict[str, str], features: list[str] | None = None
            ) -> list[Requirement]:
    """The requirements the kernel does not meet: an option that is off, or `=m` without its
    module file."""
    modules = kernel.module_files()
    out = []
    for req in requirements(kernel.arch, features):
        value = config.get(req.option)
        if value == "y":
            continue
        if value == "m" and _module_for(req.option, modules):
            continue
        out.append(req)
    return out


# Module file names for the options whose module is not simply the lowercase option name.
_MODULE_OF = {"VIRTIO_IOMMU": "virtio_iommu", "VFIO_PCI": "vfio_pci", "VFIO": "vfio",
              "VFIO_IOMMU_TYPE1": "vfio_iommu_type1", "VIRTIO_BLK": "virtio_blk",
              "VIRTIO_NET": "virtio_net", "VIRTIO_PCI": "virtio_pci", "VFAT_FS": "vfat"}


def module_of(option: str) -> str:
    """The module an `=m` option builds."""
    return _MODULE_OF.get(option, option.lower())


def _module_for(option: str, modules: dict[str, Path]) -> bool:
    return module_of(option) in modules


def explain(kernel: Kernel, gaps: list[Requirement]) -> str:
    """One error message naming every option to turn on and why."""
    names = ", ".join(f"CONFIG_{r.option} ({r.why})" for r in gaps)
    return (f"kernel {kernel.release} ({kernel.origin}) lacks what viommu needs: {names}. "
            "Turn them on (=y, or =m with the module installed): `viommu kconfig > "
            "viommu.config` writes a fragment for scripts/kconfig/merge_config.sh")


def fragment(arch: str, features: list[str] | None = None) -> str:
    lines = [f"# viommu: what a guest kernel for {arch} needs (merge with "
             "scripts/kconfig/merge_config.sh)"]
    for req in requirements(arch, features):
        scope = f" [{req.feature}]" if req.feature else ""
        lines.append(f"# {req.why}{scope}")
        lines.append(f"CONFIG_{req.option}=y")
    return "\n".join(lines) + "\n"
