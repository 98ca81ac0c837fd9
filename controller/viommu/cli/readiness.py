"""`viommu setup` on the command line, and `--setup` for the commands that boot a VM: it
runs the same set-up for that VM's architecture and kernel before anything starts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from viommu.provision import DEFAULT_KERNEL, ensure, setup_cli
from viommu.vm.boot import choose_arch, choose_kernel
from viommu.vm.profile import load_profile

HELP = setup_cli.HELP
EXAMPLES = setup_cli.EXAMPLES
add_arguments = setup_cli.add_arguments


def cmd_setup(args: argparse.Namespace) -> int:
    return setup_cli.run(args)


def add_setup_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setup", action="store_true",
                        help="run `viommu setup` for this VM's architecture and kernel first")


def setup_if_asked(args: argparse.Namespace, profile: str) -> None:
    """--setup: `viommu setup` for the architecture and kernel this command boots (chosen as
    Machine chooses them: options, environment, profile, defaults)."""
    if not getattr(args, "setup", False):
        return
    loaded = load_profile(profile)
    kernel = choose_kernel(args.kernel, loaded) or DEFAULT_KERNEL
    ensure(choose_arch(args.arch, loaded), (kernel,))


def profile_argument(profile: str) -> str:
    """A profile given as a path is kept absolute, so that the VM's state.json still finds it
    from another directory; a name stays a name (qemu-configs/NAME.toml)."""
    path = Path(profile).expanduser()
    return str(path.resolve()) if path.suffix or os.sep in profile else profile
