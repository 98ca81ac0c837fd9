"""Which QEMU accelerator runs our guests here: KVM where it works, else TCG."""

from __future__ import annotations

import os


def detect_accel() -> str:
    """VIOMMU_ACCEL when set; else KVM where it works, and TCG where there is no usable
    /dev/kvm, or where it is kvm_pvm (on which Linux guests die with a KVM emulation failure)."""
    forced = os.environ.get("VIOMMU_ACCEL")
    if forced:
        return forced
    return "tcg" if kvm_unusable_reason() else "kvm"


def kvm_unusable_reason() -> str | None:
    """Why KVM cannot run our guests here, or None when it can."""
    if os.path.exists("/sys/module/kvm_pvm"):
        return "the host's KVM is kvm_pvm, on which Linux guests die with an emulation failure"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return None
