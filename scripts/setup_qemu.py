"""Provide QEMU >= 10.2 at .cache/bin/qemu-system-x86_64.

The system's QEMU is used when it is new enough and has the devices we need; otherwise
Debian's trixie-backports build is unpacked into .cache/qemu with its library closure and run
through the prefix's own dynamic loader, leaving the system untouched.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from debapt import PrivateApt, extract, progress  # noqa: E402

from viommu.vm.paths import MIN_QEMU_VERSION, qemu_version  # noqa: E402 - set-up installed it

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
LAUNCHER = CACHE / "bin" / "qemu-system-x86_64"
PREFIX = CACHE / "qemu"
NEEDED_DEVICES = ("vhost-user-test-device-pci", "vfio-user-pci", "pcie-root-port")


def has_devices(binary: str) -> bool:
    out = subprocess.run([binary, "-device", "help"], capture_output=True, text=True,
                         timeout=30).stdout
    return all(f'"{dev}"' in out for dev in NEEDED_DEVICES)


def usable(binary: str) -> bool:
    version = qemu_version(binary)
    return version is not None and version >= MIN_QEMU_VERSION and has_devices(binary)


def install_private_qemu() -> None:
    progress("installing QEMU from Debian trixie-backports into .cache/qemu (~40 MB)")
    apt = PrivateApt(CACHE / "apt", ["trixie", "trixie-backports"])
    apt.update()
    debs = apt.download_closure("qemu-system-x86", release="trixie-backports")
    if PREFIX.exists():
        shutil.rmtree(PREFIX)
    PREFIX.mkdir(parents=True)
    progress(f"unpacking {len(debs)} packages")
    for deb in debs:
        extract(deb, PREFIX)
    libdir = PREFIX / "usr/lib/x86_64-linux-gnu"
    # QEMU finds firmware and modules relative to its "bundle" root: point it at the prefix.
    bundle = libdir / "qemu-bundle"
    if bundle.is_symlink() or bundle.exists():
        bundle.unlink()
    bundle.symlink_to("../../..")
    LAUNCHER.parent.mkdir(parents=True, exist_ok=True)
    LAUNCHER.unlink(missing_ok=True)
    LAUNCHER.write_text(
        "#!/bin/sh\n"
        "# QEMU from .cache/qemu, run with its own loader and libraries (scripts/setup_qemu.py)\n"
        'P="$(dirname "$(readlink -f "$0")")/../qemu"\n'
        'L="$P/usr/lib/x86_64-linux-gnu"\n'
        'exec "$L/ld-linux-x86-64.so.2" --library-path "$L:$L/pulseaudio" '
        '"$P/usr/bin/qemu-system-x86_64" "$@"\n')
    LAUNCHER.chmod(0o755)


def main() -> None:
    if LAUNCHER.exists() and usable(str(LAUNCHER)):
        version = qemu_version(str(LAUNCHER))
        progress(f"QEMU {version[0]}.{version[1]} ready ({LAUNCHER.relative_to(ROOT)})")
        return
    system = shutil.which("qemu-system-x86_64")
    if system and usable(system):
        LAUNCHER.parent.mkdir(parents=True, exist_ok=True)
        LAUNCHER.unlink(missing_ok=True)
        LAUNCHER.symlink_to(system)
        progress(f"using the system QEMU {system}")
        return
    install_private_qemu()
    if not usable(str(LAUNCHER)):
        sys.exit("error: the unpacked QEMU does not run or lacks "
                 f"{', '.join(NEEDED_DEVICES)}; see {PREFIX}")
    version = qemu_version(str(LAUNCHER))
    progress(f"QEMU {version[0]}.{version[1]} installed")


if __name__ == "__main__":
    main()
