"""What a Machine boots, decided before anything starts: the platform for its architecture,
QEMU, the guest kernel and its initramfs (fetched or built on first use), the kernel's
configuration checked against what viommu needs, and the kernel command line.

Choices come from the Machine's arguments, else the environment (VIOMMU_ARCH,
VIOMMU_KERNEL), else the profile, else the defaults (x86_64, Debian's newest 7.x).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from viommu.provision import DEFAULT_ARCH, kconfig
from viommu.provision.arch import Arch, get_arch
from viommu.provision.cache import SetupMissing
from viommu.provision.initramfs import GuestImage, ensure_image
from viommu.provision.kernels import resolve_kernel
from viommu.provision.qemu import ensure_qemu, find_qemu, launcher, qemu_version, version_text
from viommu.vm.errors import MachineError
from viommu.vm.guest_kernel import GuestKernel
from viommu.vm.platforms import Platform, platform
from viommu.vm.profile import Profile

log = logging.getLogger(__name__)


class KernelRefused(MachineError):
    """The guest kernel lacks what viommu needs; the message names the options to turn on."""


@dataclasses.dataclass(frozen=True)
class GuestBoot:
    platform: Platform
    qemu: str  # the binary
    image: GuestImage
    guest: GuestKernel  # what this kernel does that others do not
    cmdline: str

    @property
    def kernel_description(self) -> str:
        """The exact kernel, for reports: release and where it came from."""
        return f"{self.image.kernel.release} ({self.image.kernel.origin})"

    @property
    def qemu_description(self) -> str:
        """The QEMU binary and its version, for reports."""
        return f"{self.qemu} (QEMU {version_text(qemu_version(self.qemu))})"


def choose_arch(arch: str | None, profile: Profile) -> str:
    return get_arch(arch or os.environ.get("VIOMMU_ARCH") or profile.arch
                    or DEFAULT_ARCH).name


def choose_kernel(kernel: str | None, profile: Profile) -> str | None:
    return kernel or os.environ.get("VIOMMU_KERNEL") or profile.kernel


def prepare(profile: Profile, arch: str, kernel: str | None, modules: str | Path | None,
            features: list[str]) -> GuestBoot:
    """Everything the boot needs, provided on first use; KernelRefused when the kernel's
    configuration lacks an option viommu or one of `features` needs."""
    target = get_arch(arch)
    qemu = _qemu(target)
    found = resolve_kernel(kernel, target, modules)
    config = kconfig.read_config(found)
    if config is None:
        log.warning("kernel %s: no configuration found (no .config or config-%s beside it, no "
                    "IKCONFIG in the image): cannot check it before boot", found.release,
                    found.release)
    else:
        gaps = kconfig.missing(found, config, features)
        if gaps:  # before the initramfs is built: a refused kernel costs nothing
            raise KernelRefused(kconfig.explain(found, gaps))
    image = ensure_image(found, target)
    board = platform(target.name)
    cmdline = kernel_cmdline(profile, board)
    return GuestBoot(board, qemu, image, GuestKernel.of(image.kernel, config, cmdline), cmdline)


def _qemu(target: Arch) -> str:
    """QEMU for the architecture: VIOMMU_QEMU, what set-up installed, or installed now (the
    first use of an architecture)."""
    if os.environ.get("VIOMMU_QEMU") or launcher(target).exists():
        return find_qemu(target)
    return ensure_qemu(target)


def kernel_cmdline(profile: Profile, board: Platform) -> str:
    """The profile's command line with the platform's serial console (unless it names one),
    and on x86 the table area reserved from the kernel (memmap=); on aarch64 the device tree
    reserves it (viommu.vm.devicetree). Then what the profile or the Machine appends."""
    words = [] if "console=" in profile.cmdline else [board.console_arg()]
    words.append(profile.cmdline)
    if profile.table_area_size and board.topology == "viot":
        words.append(f"memmap={profile.table_area_size:#x}${profile.table_area_base:#x}")
    words.append(profile.cmdline_append)
    return " ".join(w for w in words if w)


def describe_choice(profile: Profile | str, kernel: str | None = None, arch: str | None = None
                    ) -> str:
    """Which architecture, kernel and QEMU a Machine with these choices boots, without
    fetching anything (a Debian series not fetched yet is named by its series)."""
    from viommu.vm.profile import load_profile  # noqa: PLC0415

    loaded = load_profile(profile) if isinstance(profile, str) else profile
    target = get_arch(choose_arch(arch, loaded))
    spec = choose_kernel(kernel, loaded)
    try:
        k = resolve_kernel(spec, target, loaded.kernel_modules, fetch=False)
        kernel_text = f"kernel {k.release} ({k.origin})"
    except SetupMissing:
        kernel_text = f"Debian kernel {spec or 'default'} (fetched at first use)"
    except ValueError as exc:
        kernel_text = f"kernel {spec} ({exc})"
    try:
        binary = find_qemu(target)
        qemu_text = f"QEMU {version_text(qemu_version(binary))} ({binary})"
    except SetupMissing as exc:  # VIOMMU_QEMU names one that does not work; or none yet
        qemu_text = (f"QEMU unusable ({exc})" if os.environ.get("VIOMMU_QEMU")
                     else "QEMU not set up yet (installed at first use)")
    return f"{target.name}, {kernel_text}, {qemu_text}"
