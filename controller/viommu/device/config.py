"""What the virtio-iommu device advertises (virtio spec 5.13.4, struct virtio_iommu_config)
and the bounds it keeps instead of exhausting memory."""

from __future__ import annotations

import dataclasses
import struct

from viommu.uapi import CONFIG_SIZE, MSI_WINDOW_X86

# struct virtio_iommu_config: page_size_mask, input_range {start, end}, domain_range
# {start, end}, probe_size, bypass, reserved.
_CONFIG = struct.Struct("<QQQIIIB3x")
assert _CONFIG.size == CONFIG_SIZE
BYPASS_OFFSET = 36  # the only driver-writable field


class ResourceLimit(RuntimeError):
    """A configured bound was reached (DeviceConfig says which)."""


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """What the device advertises in its config space, and its limits."""

    page_size_mask: int = 0xFFFF_FFFF_FFFF_F000  # 4 KiB granule
    input_range: tuple[int, int] = (0, (1 << 48) - 1)
    domain_range: tuple[int, int] = (0, 0xFFFF)
    probe_size: int = 512
    bypass: bool = False
    resv_msi: tuple[int, int] = MSI_WINDOW_X86
    # Limits instead of exhaustion: past them the guest gets S_NOMEM (spec: "insufficient
    # resources") and the backend's memory stays flat whatever the guest asks for.
    max_domains: int = 1024
    max_mappings_per_domain: int = 65536
    max_mappings: int = 262144
    max_endpoints: int = 4096

    @property
    def granule(self) -> int:
        return self.page_size_mask & -self.page_size_mask

    def space(self, bypass: bool) -> bytes:
        """The config space as the driver reads it, with the current `bypass`."""
        return _CONFIG.pack(self.page_size_mask, *self.input_range, *self.domain_range,
                            self.probe_size, int(bypass))
