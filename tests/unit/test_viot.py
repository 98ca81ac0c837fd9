"""The VIOT we hand QEMU with -acpitable: byte-exact against worked examples written out from
the table's layout (ACPI 6.4 §5.2.30), and parsed the way Linux's drivers/acpi/viot.c parses
it."""

from __future__ import annotations

import struct

import pytest

from viommu.vm.profile import load_profile
from viommu.vm.viot import PciRange, bdf, build_viot

QEMU_HEADER = {"oem_id": b"BOCHS ", "oem_table_id": b"BXPC    ", "creator_id": b"BXPC"}

# Variant A: the virtio-pci IOMMU node for 00:03.0 and one PCI range node, 0x0000-0xffff.
VARIANT_A = bytes.fromhex(
    "56494f5458000000" "0057424f43485320" "4258504320202020" "0100000042585043"
    "0100000002003000" "0000000000000000" "0300100000001800" "0000000000000000"
    "0100180000000000" "000000000000ffff" "3000000000000000")
# Variant B: the same with the IOMMU's own BDF excluded (two ranges).
VARIANT_B = bytes.fromhex(
    "56494f5470000000" "00ac424f43485320" "4258504320202020" "0100000042585043"
    "0100000003003000" "0000000000000000" "0300100000001800" "0000000000000000"
    "0100180000000000" "0000000000001700" "3000000000000000" "0100180019000000"
    "000000001900ffff" "3000000000000000")


def test_viot_matches_the_worked_example_byte_for_byte() -> None:
    assert build_viot(0x18, [PciRange(0, 0xFFFF)], **QEMU_HEADER) == VARIANT_A


def test_viot_with_two_ranges_matches_the_worked_example() -> None:
    ranges = [PciRange(0, 0x17), PciRange(0x19, 0xFFFF)]
    assert build_viot(0x18, ranges, **QEMU_HEADER) == VARIANT_B


def test_viot_checksum_makes_the_bytes_sum_to_zero() -> None:
    table = build_viot(0x18, [PciRange(0x100, 0x1FF), PciRange(0x200, 0x2FF)])
    assert sum(table) % 256 == 0
    assert struct.unpack_from("<I", table, 4)[0] == len(table)


def linux_endpoint_id(table: bytes, segment: int, rid: int) -> int | None:
    """drivers/acpi/viot.c: walk node_count nodes from node_offset; PCI range → endpoint."""
    count, offset = struct.unpack_from("<HH", table, 36)
    for _ in range(count):
        kind, length = struct.unpack_from("<BxH", table, offset)
        if kind == 1:
            ep_start, seg_start, seg_end, bdf_start, bdf_end, out = struct.unpack_from(
                "<IHHHHH", table, offset + 4)
            if (seg_start <= segment <= seg_end and bdf_start <= rid <= bdf_end
                    and table[out] == 3):
                return ((segment - seg_start) << 16) + rid - bdf_start + ep_start
        offset += length
    return None


def test_default_profile_viot_covers_the_root_port_buses_only() -> None:
    profile = load_profile("default")
    table = build_viot(profile.iommu_bdf, profile.viot_ranges())
    assert linux_endpoint_id(table, 0, bdf(1, 0)) == 0x100
    assert linux_endpoint_id(table, 0, bdf(4, 3, 1)) == bdf(4, 3, 1)
    assert linux_endpoint_id(table, 0, bdf(0, 2)) is None  # QEMU's own devices stay outside
    assert linux_endpoint_id(table, 0, bdf(5, 0)) is None
    assert profile.endpoint_id("ep0") == 0x100


def test_viot_needs_a_range() -> None:
    with pytest.raises(ValueError):
        build_viot(0x18, [])


def test_bdf_rejects_impossible_addresses() -> None:
    with pytest.raises(ValueError):
        bdf(0, 32)
