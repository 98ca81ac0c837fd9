"""What a guest kernel does that depends on its version and configuration, in one table.

Tests and the controller ask `GuestKernel` instead of hard-coding one kernel's behaviour.
Each entry, with how it was observed under viommu (the guest's own output):

- When an endpoint joins an IOMMU group and gets its PROBE and ATTACH.
  7.x: when the IOMMU registers, driver or not (`pci 0000:01:00.0: Adding to iommu group 0`
  at boot for a device no driver binds). 6.12 and older: only when a driver binds it (no
  group for a driverless endpoint; `vfio-pci 0000:02:00.0: Adding to iommu group 0` once
  bound). The change came with the IOMMU core's move of firmware (DT/ACPI) parsing into its
  own probe path ("iommu: Get DT/ACPI parsing into the proper probe path", Linux 6.15).
- UNMAP flushing. Deferred (DMA-FQ) with CONFIG_IOMMU_DEFAULT_DMA_LAZY (Debian x86_64:
  `iommu: DMA domain TLB invalidation policy: lazy mode`), strict with
  CONFIG_IOMMU_DEFAULT_DMA_STRICT (Debian arm64); `iommu.strict=` overrides either.
- Domain IDs: the first ATTACH names domain 0 on 6.12 and 1 on 7.x. Never assume one.
- Fault lines: rate-limited to 10 per 5 s (dev_err_ratelimited) on every version. On 6.12
  the serial console prints them inside the eventq's interrupt handler: under TCG a burst
  that fills the eventq then drains at about one event a second while the console prints
  (with `dmesg -n 1`, 200 events drain at once); 7.x drains as fast either way.
- VFIO MSI of an endpoint on arm64 (the ITS doorbell reported as a RESV_MEM MSI region):
  works on 6.12; 7.x refuses VFIO_DEVICE_SET_IRQS with ENOSPC (no MSI cookie without a
  software MSI region after the DMA-cookie rework), behind QEMU's own virtio-iommu-pci too.
"""

from __future__ import annotations

import dataclasses
import re

from viommu.provision.kernels import Kernel

ATTACH_AT_REGISTRATION_SINCE = (6, 15)
FAULT_LINES_PER_WINDOW = 10  # DEFAULT_RATELIMIT_BURST
FAULT_WINDOW_S = 5.0  # DEFAULT_RATELIMIT_INTERVAL


def parse_release(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match[1]), int(match[2])) if match else (0, 0)


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    release: str
    arch: str
    config: dict[str, str] = dataclasses.field(default_factory=dict)
    cmdline: str = ""

    @classmethod
    def of(cls, kernel: Kernel, config: dict[str, str] | None, cmdline: str) -> GuestKernel:
        return cls(kernel.release, kernel.arch, config or {}, cmdline)

    @property
    def version(self) -> tuple[int, int]:
        return parse_release(self.release)

    @property
    def attaches_at_registration(self) -> bool:
        """Endpoints get a group, a PROBE and an ATTACH as soon as the IOMMU registers, with
        or without a driver; else only once a driver binds them."""
        return self.version >= ATTACH_AT_REGISTRATION_SINCE

    @property
    def lazy_unmap(self) -> bool:
        """DMA domains defer IOTLB flushes (DMA-FQ): UNMAP requests batch up."""
        if re.search(r"\biommu\.strict=1\b", self.cmdline):
            return False
        if re.search(r"\biommu\.strict=0\b", self.cmdline):
            return True
        return self.config.get("IOMMU_DEFAULT_DMA_LAZY") == "y"

    @property
    def vfio_msi_behind_viommu(self) -> bool:
        """A guest VFIO user can enable an endpoint's MSI behind a virtio-iommu. On x86 the
        MSI window is bypassed; on arm64 7.x refuses it (see the table above)."""
        return self.arch == "x86_64" or self.version < ATTACH_AT_REGISTRATION_SINCE

    def describe(self) -> str:
        attach = "when the IOMMU registers" if self.attaches_at_registration else "at driver bind"
        flush = "lazy" if self.lazy_unmap else "strict"
        return f"{self.release} ({self.arch}): endpoints attached {attach}, {flush} UNMAP flushing"
