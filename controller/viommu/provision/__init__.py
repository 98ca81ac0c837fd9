"""What viommu needs on the host before a VM boots, fetched and built on demand: QEMU, guest
kernels (Debian's, or the user's own), and the busybox initramfs built for each kernel.

Everything lands in one per-user cache (viommu.provision.cache) shared by every checkout and
virtualenv. `viommu setup` (and the checkout's ./scripts/setup) runs `ensure()`; the VM side
looks artefacts up and says to run `viommu setup` when one is missing.
"""

from __future__ import annotations

from pathlib import Path

from viommu.provision.arch import DEFAULT_ARCH, get_arch
from viommu.provision.initramfs import GuestImage, ensure_image
from viommu.provision.kernels import DEFAULT_KERNEL, resolve_kernel
from viommu.provision.qemu import ensure_qemu

__all__ = ["DEFAULT_ARCH", "DEFAULT_KERNEL", "ensure", "guest_image"]


def guest_image(arch: str = DEFAULT_ARCH, kernel: str | None = None,
                modules: str | Path | None = None) -> GuestImage:
    """The kernel and initramfs to boot: a Debian series is fetched and a user's kernel
    gets its initramfs built on first use, with progress lines."""
    target = get_arch(arch)
    return ensure_image(resolve_kernel(kernel, target, modules), target)


def ensure(arch: str = DEFAULT_ARCH, kernels: tuple[str, ...] = (DEFAULT_KERNEL,)) -> None:
    """What `viommu setup` does: QEMU for `arch`, and a guest image for each kernel."""
    ensure_qemu(get_arch(arch))
    for kernel in kernels:
        guest_image(arch, kernel)
