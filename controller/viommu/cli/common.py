"""What the `viommu` commands share: their error type, how they print, and a named running
VM driven from this process."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from viommu.provision.arch import ARCHES
from viommu.provision.kernels import DEBIAN_SERIES, DEFAULT_KERNEL
from viommu.vm import runs
from viommu.vm.machine import Machine


class CliError(RuntimeError):
    """A mistake on the command line; the message says what to do instead."""


def say(text: str = "") -> None:
    print(text, flush=True)


def note(text: str) -> None:
    print(f"viommu: note: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def attached_vm(name: str) -> Iterator[tuple[Machine, runs.RunState, Path]]:
    """The running VM `name`, driven from this process and released (left running) after."""
    directory, state = runs.find_run(name)
    vm = Machine.attach(directory)
    try:
        yield vm, state, directory
    finally:
        vm.release()



def add_guest_arguments(parser: argparse.ArgumentParser) -> None:
    """--kernel, --modules and --arch: which guest boots (fetched or built on first use)."""
    parser.add_argument("--kernel", metavar="SPEC",
                        help=f"the guest kernel: a Debian series ({', '.join(DEBIAN_SERIES)}; "
                             f"default {DEFAULT_KERNEL}, or VIOMMU_KERNEL), a kernel build tree "
                             "(as `vng` takes one), or a kernel image")
    parser.add_argument("--modules", metavar="DIR",
                        help="with --kernel IMAGE: its modules, a lib/modules/<release> tree")
    parser.add_argument("--arch", choices=sorted(ARCHES),
                        help="guest architecture (default x86_64, or VIOMMU_ARCH)")
