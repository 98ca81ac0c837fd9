"""QEMU >= 10.2 for each guest architecture.

`vhost-user-test-device-pci` is user-creatable only from QEMU 10.2 and `vfio-user-pci`
exists from 10.1. The system's QEMU is used when it is new enough and has those devices;
otherwise Debian trixie-backports' build is unpacked into the cache with its library closure
and run through the prefix's own dynamic loader, leaving the system untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from viommu.provision.arch import Arch
from viommu.provision.cache import SetupMissing, cache_dir, locked, progress
from viommu.provision.debian import PrivateApt, extract

MIN_QEMU_VERSION = (10, 2)
NEEDED_DEVICES = ("vhost-user-test-device-pci", "vfio-user-pci", "pcie-root-port")
_HOST_LIBDIR = "usr/lib/x86_64-linux-gnu"  # the prefix holds host (amd64) libraries


def qemu_version(binary: str) -> tuple[int, int] | None:
    """(major, minor) from `binary --version`; None if it does not run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"version (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


def version_text(version: tuple[int, int] | None) -> str:
    return "?" if version is None else f"{version[0]}.{version[1]}"


def usable(binary: str) -> bool:
    version = qemu_version(binary)
    if version is None or version < MIN_QEMU_VERSION:
        return False
    out = subprocess.run([binary, "-device", "help"], capture_output=True, text=True,
                         timeout=30).stdout
    return all(f'"{dev}"' in out for dev in NEEDED_DEVICES)


def launcher(arch: Arch) -> Path:
    return cache_dir("qemu", arch.name, "bin") / arch.qemu_binary


def find_qemu(arch: Arch) -> str:
    """The QEMU to run for `arch`: VIOMMU_QEMU when set (it must work: an explicit choice
    is never replaced silently), else what set-up provided."""
    forced = os.environ.get("VIOMMU_QEMU")
    if forced:
        need = (f"point it at a {arch.qemu_binary} >= {version_text(MIN_QEMU_VERSION)}, or "
                "unset it to use the QEMU `viommu setup` provides")
        if not os.access(forced, os.X_OK):
            raise SetupMissing(f"VIOMMU_QEMU={forced} is not an executable file: {need}")
        version = qemu_version(forced)
        if version is None or version < MIN_QEMU_VERSION:
            found = "does not run" if version is None else f"is QEMU {version_text(version)}"
            raise SetupMissing(f"VIOMMU_QEMU={forced} {found}: {need}")
        return forced
    path = launcher(arch)
    if path.exists():
        return str(path)
    raise SetupMissing(f"no {arch.qemu_binary}: run `viommu setup --arch {arch.name}` (it "
                       f"installs QEMU >= {version_text(MIN_QEMU_VERSION)} into the cache), "
                       "or set VIOMMU_QEMU")


def ensure_qemu(arch: Arch) -> str:
    """Provide QEMU for `arch` (idempotent: a second call checks and returns)."""
    with locked(f"qemu-{arch.name}"):
        return _ensure_qemu(arch)


def _ensure_qemu(arch: Arch) -> str:
    path = launcher(arch)
    if path.exists() and usable(str(path)):
        progress(f"QEMU {version_text(qemu_version(str(path)))} ready ({arch.qemu_binary})")
        return str(path)
    system = shutil.which(arch.qemu_binary)
    if system and usable(system):
        path.unlink(missing_ok=True)
        path.symlink_to(system)
        progress(f"using the system QEMU {system}")
        return str(path)
    _install_private(arch, path)
    if not usable(str(path)):
        raise SetupMissing(f"the unpacked QEMU does not run or lacks {', '.join(NEEDED_DEVICES)};"
                           f" see {path.parents[1]}")
    progress(f"QEMU {version_text(qemu_version(str(path)))} installed ({arch.qemu_binary})")
    return str(path)


def _install_private(arch: Arch, path: Path) -> None:
    progress(f"installing {arch.qemu_package} from Debian trixie-backports into the cache "
             "(~40 MB)")
    # A state of its own: download_closure returns every .deb its cache holds.
    apt = PrivateApt(cache_dir("apt", f"qemu-{arch.name}"), ["trixie", "trixie-backports"],
                     "amd64")
    debs = apt.download_closure(arch.qemu_package, release="trixie-backports")
    prefix = path.parents[1] / "prefix"
    if prefix.exists():
        shutil.rmtree(prefix)
    prefix.mkdir(parents=True)
    progress(f"unpacking {len(debs)} packages")
    for deb in debs:
        extract(deb, prefix)
    # QEMU finds firmware and modules relative to its "bundle" root: point it at the prefix.
    bundle = prefix / _HOST_LIBDIR / "qemu-bundle"
    if bundle.is_symlink() or bundle.exists():
        bundle.unlink()
    bundle.symlink_to("../../..")
    path.unlink(missing_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        "# QEMU from viommu's cache, run with its own loader and libraries\n"
        'P="$(dirname "$(readlink -f "$0")")/../prefix"\n'
        f'L="$P/{_HOST_LIBDIR}"\n'
        'exec "$L/ld-linux-x86-64.so.2" --library-path "$L:$L/pulseaudio" '
        f'"$P/usr/bin/{arch.qemu_binary}" "$@"\n')
    path.chmod(0o755)
