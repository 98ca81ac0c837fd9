"""ACPI VIOT (Virtual I/O Translation Table, ACPI 6.4 §5.2.30; Linux actbl3.h, drivers/acpi/viot.c).

Built for QEMU's `-acpitable file=`: the virtio-pci IOMMU node plus one PCI-range node per
bus whose devices the backend really translates (its own endpoints on dedicated root ports).
QEMU-emulated devices stay outside: QEMU does their DMA itself, untranslated.
"""

from __future__ import annotations

import dataclasses
import struct

ACPI_HEADER = struct.Struct("<4sIBB6s8sI4sI")
VIOT_HEADER = struct.Struct("<HH8x")  # node_count, node_offset, reserved
VIOT_NODE_PCI_RANGE = 1
VIOT_NODE_VIRTIO_IOMMU_PCI = 3
_PCI_RANGE_NODE = struct.Struct("<BxHIHHHHH6x")  # 24 bytes
_VIRTIO_PCI_NODE = struct.Struct("<BxHHH8x")  # 16 bytes
_CHECKSUM_OFFSET = 9


def bdf(bus: int, device: int, function: int = 0) -> int:
    """PCI requester ID: bus[15:8] device[7:3] function[2:0]."""
    if not (0 <= bus < 256 and 0 <= device < 32 and 0 <= function < 8):
        raise ValueError(f"invalid PCI address {bus:02x}:{device:02x}.{function}")
    return bus << 8 | device << 3 | function


@dataclasses.dataclass(frozen=True)
class PciRange:
    """Requester IDs bdf_start..bdf_end on `segment` get endpoint IDs from endpoint_start."""

    bdf_start: int
    bdf_end: int
    endpoint_start: int | None = None  # default: endpoint ID = requester ID
    segment: int = 0

    def endpoint_id(self, rid: int) -> int:
        start = self.bdf_start if self.endpoint_start is None else self.endpoint_start
        return start + rid - self.bdf_start


def build_viot(iommu_bdf: int, ranges: list[PciRange], iommu_segment: int = 0,
               oem_id: bytes = b"VIOMMU", oem_table_id: bytes = b"VIOMMU  ",
               creator_id: bytes = b"VMMU") -> bytes:
    """The whole table, header included, with a valid checksum."""
    if not ranges:
        raise ValueError("a VIOT needs at least one endpoint range")
    nodes_offset = ACPI_HEADER.size + VIOT_HEADER.size
    iommu_node = _VIRTIO_PCI_NODE.pack(VIOT_NODE_VIRTIO_IOMMU_PCI, _VIRTIO_PCI_NODE.size,
                                       iommu_segment, iommu_bdf)
    body = [iommu_node]
    for r in ranges:
        if not 0 <= r.bdf_start <= r.bdf_end <= 0xFFFF:
            raise ValueError(f"bad requester-ID range {r.bdf_start:#x}-{r.bdf_end:#x}")
        start = r.bdf_start if r.endpoint_start is None else r.endpoint_start
        body.append(_PCI_RANGE_NODE.pack(VIOT_NODE_PCI_RANGE, _PCI_RANGE_NODE.size, start,
                                         r.segment, r.segment, r.bdf_start, r.bdf_end,
                                         nodes_offset))
    payload = VIOT_HEADER.pack(len(body), nodes_offset) + b"".join(body)
    length = ACPI_HEADER.size + len(payload)
    header = ACPI_HEADER.pack(b"VIOT", length, 0, 0, oem_id.ljust(6)[:6],
                              oem_table_id.ljust(8)[:8], 1, creator_id.ljust(4)[:4], 1)
    table = bytearray(header + payload)
    table[_CHECKSUM_OFFSET] = (-sum(table)) & 0xFF
    return bytes(table)
