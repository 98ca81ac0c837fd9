"""Where set-up puts things: QEMU and the guest image live under the checkout's .cache/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CACHE = ROOT / ".cache"
QEMU_CONFIGS = ROOT / "qemu-configs"
GUEST_DIR = CACHE / "guest"
# vhost-user-test-device-pci with config space and vfio-user-pci arrived in 10.2.
MIN_QEMU_VERSION = (10, 2)


class SetupMissing(RuntimeError):
    """Something ./scripts/setup provides is not there."""


def qemu_binary() -> str:
    """VIOMMU_QEMU, else what set-up installed, else qemu-system-x86_64 on PATH."""
    candidates = [os.environ.get("VIOMMU_QEMU"), str(CACHE / "bin" / "qemu-system-x86_64"),
                  shutil.which("qemu-system-x86_64")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SetupMissing("no QEMU found: run ./scripts/setup (it installs QEMU >= 10.2 into "
                       ".cache), or set VIOMMU_QEMU")


def guest_image() -> tuple[Path, Path, dict]:
    """(kernel, initramfs, manifest) built by guest-images/build.py."""
    manifest_path = GUEST_DIR / "manifest.json"
    if not manifest_path.exists():
        raise SetupMissing("no guest image: run ./scripts/setup (it builds .cache/guest)")
    manifest = json.loads(manifest_path.read_text())
    return GUEST_DIR / manifest["kernel"], GUEST_DIR / manifest["initramfs"], manifest


def qemu_version(binary: str) -> tuple[int, int] | None:
    """(major, minor) from `binary --version`; None if it does not run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"version (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None
