"""The guest architectures viommu runs, and what differs between them on the host side:
QEMU's binary and Debian package, Debian's names, where a kernel build tree keeps its image,
and the C compiler that builds static guest tools."""

from __future__ import annotations

import dataclasses
import platform


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str  # QEMU's name: x86_64, aarch64
    debian: str  # Debian's architecture: amd64, arm64
    qemu_package: str  # the Debian package with qemu-system-<name>
    kernel_meta: str  # Debian's metapackage for the newest kernel of a suite
    tree_image: str  # the bootable image in a kernel build tree
    cross_prefix: str  # GNU triplet- of the cross compiler, for builds on another host
    cross_packages: tuple[str, ...]  # Debian packages with that compiler and its libc

    @property
    def qemu_binary(self) -> str:
        return f"qemu-system-{self.name}"

    @property
    def native(self) -> bool:
        return platform.machine() == self.name

    def compiler(self) -> str:
        return "cc" if self.native else f"{self.cross_prefix}gcc"


ARCHES = {
    "x86_64": Arch("x86_64", "amd64", "qemu-system-x86", "linux-image-amd64",
                   "arch/x86/boot/bzImage", "x86_64-linux-gnu-",
                   ("gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross")),
    "aarch64": Arch("aarch64", "arm64", "qemu-system-arm", "linux-image-arm64",
                    "arch/arm64/boot/Image", "aarch64-linux-gnu-",
                    ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross")),
}
DEFAULT_ARCH = "x86_64"


def get_arch(name: str) -> Arch:
    """An architecture by QEMU's or Debian's name; ValueError naming the known ones."""
    for arch in ARCHES.values():
        if name in (arch.name, arch.debian) or (name == "arm64" and arch.name == "aarch64"):
            return arch
    raise ValueError(f"unknown architecture {name!r}; viommu runs {', '.join(ARCHES)}")
