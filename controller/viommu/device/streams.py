"""The device's view of streams: domains and the endpoints attached to them."""

from __future__ import annotations

import dataclasses

from viommu.device.mappings import MappingTable


@dataclasses.dataclass
class Domain:
    domain_id: int
    bypass: bool
    endpoints: set[int] = dataclasses.field(default_factory=set)
    mappings: MappingTable = dataclasses.field(default_factory=MappingTable)
    # Page-table domain (ATTACH_TABLE): the STE words its endpoints share.
    table: tuple[int, int] | None = None

    @property
    def takes_map(self) -> bool:
        """MAP and UNMAP apply to it (not bypass, not page-table)."""
        return not self.bypass and self.table is None

    def to_dict(self) -> dict:
        out = {"domain": self.domain_id, "bypass": self.bypass,
               "endpoints": sorted(self.endpoints),
               "mappings": [mp.to_dict() for mp in self.mappings]}
        if self.table is not None:
            out["ste"] = [f"{word:#018x}" for word in self.table]
        return out


@dataclasses.dataclass
class EndpointState:
    """One endpoint (a stream: endpoint ID = StreamID) as the device sees it."""

    endpoint_id: int
    domain: int | None = None
    probed: bool = False
    # The last configuration error raised for this stream; it stays until the guest
    # reprograms the stream (ATTACH), as on hardware.
    config_fault: str | None = None
    # Page-table mode: the stream's STE words (iommufd's iommu_hwpt_arm_smmuv3 ste[0..1]),
    # bound by ATTACH_TABLE or the control API; None in MAP mode.
    table: tuple[int, int] | None = None
    # How the backend learnt of it: BOOT (its command line: a device QEMU starts with),
    # DECLARED (add-endpoint, before a device is plugged there) or SERVED (endpoint-create:
    # our own DMA endpoint, there while QEMU's vfio-user-pci is connected to it).
    origin: str = "boot"

    @property
    def seen_by_guest(self) -> bool:
        """The guest's driver probed or attached it since the last reset."""
        return self.probed or self.domain is not None


BOOT, DECLARED, SERVED = "boot", "declared", "served"
