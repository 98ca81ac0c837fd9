"""`viommu setup`: provide QEMU and guest images in the cache; idempotent, with progress."""

from __future__ import annotations

import argparse

from viommu.provision import DEFAULT_ARCH, DEFAULT_KERNEL, ensure
from viommu.provision.arch import ARCHES
from viommu.provision.cache import SetupMissing, cache_root

HELP = "fetch and build what VMs need (QEMU, guest kernels, initramfs) into the cache"
EXAMPLES = """
viommu setup                         # QEMU and the default kernel for x86_64
viommu setup --kernel 6.12 --kernel 7
viommu setup --arch aarch64"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=sorted(ARCHES), default=DEFAULT_ARCH,
                        help="guest architecture (default %(default)s)")
    parser.add_argument("--kernel", action="append", metavar="SPEC",
                        help=f"a kernel to prepare (repeat; default {DEFAULT_KERNEL}): a Debian "
                             "series (7, 6.12), a build tree or an image")


def run(args: argparse.Namespace) -> int:
    try:
        ensure(args.arch, tuple(args.kernel or (DEFAULT_KERNEL,)))
    except (SetupMissing, ValueError) as exc:
        print(f"viommu setup: {exc}")
        return 1
    print(f"==> ready (cache: {cache_root()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="viommu setup", description=HELP,
                                     epilog="examples:" + EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
