"""`viommu setup`, and what `up` and `demo` check before they start anything: each missing
piece is a SetupMissing that says to run `viommu setup`, and `--setup` runs it first."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from viommu.provision import DEFAULT_ARCH, DEFAULT_KERNEL, ensure, setup_cli
from viommu.vm import paths
from viommu.vm.paths import SetupMissing

HELP = setup_cli.HELP
EXAMPLES = setup_cli.EXAMPLES
add_arguments = setup_cli.add_arguments


def cmd_setup(args: argparse.Namespace) -> int:
    return setup_cli.run(args)


def add_setup_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setup", action="store_true",
                        help="run `viommu setup` for this VM's architecture and kernel first")


def target(args: argparse.Namespace) -> tuple[str, str | None]:
    """(architecture, kernel SPEC) a command boots; the options are there once `up` and
    `demo` take --arch and --kernel."""
    return getattr(args, "arch", None) or DEFAULT_ARCH, getattr(args, "kernel", None)


def prepare(args: argparse.Namespace) -> None:
    """Before a command boots a VM: `viommu setup` when asked (--setup), then the pre-flight."""
    arch, kernel = target(args)
    if getattr(args, "setup", False):
        ensure(arch, (kernel or DEFAULT_KERNEL,))
    preflight(arch, kernel)


def preflight(arch: str = DEFAULT_ARCH, kernel: str | None = None) -> None:
    """What booting needs before it starts anything, each with what to do when it is missing."""
    binary = paths.qemu_binary(arch)
    version = paths.qemu_version(binary)
    if version is None or version < paths.MIN_QEMU_VERSION:
        found = "does not run" if version is None else f"is {version[0]}.{version[1]}"
        need = ".".join(map(str, paths.MIN_QEMU_VERSION))
        raise SetupMissing(f"QEMU {binary} {found}; viommu needs >= {need}: run `viommu setup` "
                           "(it installs a private QEMU into its cache) or set VIOMMU_QEMU")
    paths.guest_image(arch, kernel)
    try:
        os.close(os.memfd_create("viommu-check"))
    except OSError as exc:
        raise SetupMissing(f"no shared memory: memfd_create failed ({exc.strerror}); the "
                           "backend maps guest RAM from a shared memfd: allow memfd_create "
                           "(in a container, in its seccomp profile)") from None


def profile_argument(profile: str) -> str:
    """A profile given as a path is kept absolute, so that the VM's state.json still finds it
    from another directory; a name stays a name (qemu-configs/NAME.toml)."""
    path = Path(profile).expanduser()
    return str(path.resolve()) if path.suffix or os.sep in profile else profile
