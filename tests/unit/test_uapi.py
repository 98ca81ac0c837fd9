"""Spec constants are defined once: in the data plane's headers (ext/uapi/*.pxd), exported by
viommu._dataplane, and seen from Python through viommu.uapi and viommu.events.smmuv3.

A second definition of an SMMUv3 event ID, a virtio-iommu request type or a status anywhere
in the tree fails here; so does a Python enum that drifts from the header, or a header value
that drifts from the spec (spot checks against Linux include/uapi/linux/virtio_iommu.h,
virtio_ids.h and Arm IHI 0070 7.3).
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest

from viommu import _dataplane as hw
from viommu import uapi
from viommu.device.virtio_iommu import DeviceConfig, VirtioIommuDevice
from viommu.events import smmuv3
from viommu.events.faults import FaultRecord
from viommu.events.smmuv3 import ADDRESS_EVENTS, CONFIG_EVENTS, FETCH_EVENTS, EventId
from viommu.uapi import RequestType, Status

ROOT = Path(__file__).resolve().parents[2]
HEADERS = ROOT / "ext" / "uapi"
SCANNED = [ROOT / "controller", ROOT / "ext", ROOT / "tests", ROOT / "benchmarks"]
SOURCE_SUFFIXES = {".py", ".pyx", ".pxi", ".pxd", ".h"}


def definitions(name: str, text: str) -> list[str]:
    """Lines of `text` that give `name` a value: `NAME = 4`, `NAME: int = 4` (Python, a
    Cython enum member) or `#define NAME 4` (C); not `NAME == x`."""
    pattern = re.compile(rf"^.*(\b{name}\s*(:[^=\n]*)?=(?!=)|#\s*define\s+{name}\b).*$", re.M)
    return [match.group(0).strip() for match in pattern.finditer(text)]


def source_files() -> list[Path]:
    return sorted(path for top in SCANNED for path in top.rglob("*")
                  if path.suffix in SOURCE_SUFFIXES and path.is_file())


def names_of(*enums: type) -> list[str]:
    """Member names, as the header spells them and as Python does."""
    return sorted({member.name for e in enums for member in e})


GUARDED = names_of(hw.EventId, EventId, hw.RequestType, RequestType, hw.Status, Status)


def test_the_scanner_sees_definitions_and_not_comparisons() -> None:
    text = ("    S_SAMPLE = 8\nX_S_SAMPLE = 1\nif s == S_SAMPLE: pass\nS_SAMPLE: int = 8\n"
            "#define S_SAMPLE 0x08\nstatus=S_SAMPLE\n")
    assert definitions("S_SAMPLE", text) == ["S_SAMPLE = 8", "S_SAMPLE: int = 8",
                                             "#define S_SAMPLE 0x08"]


def test_every_guarded_name_is_defined_once_in_the_headers_and_nowhere_else() -> None:
    found: dict[str, list[str]] = {name: [] for name in GUARDED}
    for path in source_files():
        text = path.read_text(errors="replace")
        for name in GUARDED:
            found[name] += [f"{path.relative_to(ROOT)}: {line}"
                            for line in definitions(name, text)]
    for name, places in found.items():
        outside = [place for place in places if not place.startswith("ext/uapi/")]
        assert not outside, f"{name} is defined outside ext/uapi/: {outside}"
    # The C names (the headers') once each; the Python names are derived, never written.
    for name in names_of(hw.EventId, hw.RequestType, hw.Status):
        assert len(found[name]) == 1, f"{name}: {found[name]}"
    for name in set(GUARDED) - set(names_of(hw.EventId, hw.RequestType, hw.Status)):
        assert found[name] == [], f"{name}: {found[name]}"


@pytest.mark.parametrize("python_enum,c_enum,prefix", [
    (uapi.RequestType, hw.RequestType, ""),
    (uapi.Status, hw.Status, "VIRTIO_IOMMU_"),
    (uapi.Feature, hw.Feature, "VIRTIO_IOMMU_"),
    (uapi.MapFlag, hw.MapFlag, "VIRTIO_IOMMU_MAP_F_"),
    (uapi.FaultReason, hw.FaultReason, "VIRTIO_IOMMU_FAULT_R_"),
    (uapi.FaultFlag, hw.FaultFlag, "VIRTIO_IOMMU_FAULT_F_"),
    (uapi.ProbeProperty, hw.ProbeProperty, "VIRTIO_IOMMU_PROBE_T_"),
    (uapi.ResvMemSubtype, hw.ResvMemSubtype, "VIRTIO_IOMMU_RESV_MEM_T_"),
    (uapi.TableFormat, hw.TableFormat, "VIRTIO_IOMMU_FORMAT_"),
    (uapi.InvalidateScope, hw.InvalidateScope, "VIRTIO_IOMMU_INVAL_S_"),
    (uapi.InvalidateCache, hw.InvalidateCache, "VIRTIO_IOMMU_INVAL_C_"),
    (uapi.InvalidateFlag, hw.InvalidateFlag, "VIRTIO_IOMMU_INVAL_F_"),
    (uapi.ExtFaultFlag, hw.ExtFaultFlag, "VIRTIO_IOMMU_FAULT_F_"),
    (uapi.PageRespCode, hw.PageRespCode, "VIRTIO_IOMMU_PAGE_RESP_"),
    (uapi.DeviceStatus, hw.DeviceStatus, "VIRTIO_CONFIG_S_"),
    (uapi.TransportFeature, hw.TransportFeature, "VIRTIO_"),
    (uapi.RingFeature, hw.RingFeature, "VIRTIO_RING_"),
    (uapi.VirtioPciCapType, hw.VirtioPciCapType, "VIRTIO_PCI_CAP_"),
    (uapi.CommonCfg, hw.CommonCfgOffset, "VIRTIO_PCI_COMMON_"),
    (uapi.BlkFeature, hw.BlkFeature, "VIRTIO_BLK_"),
    (uapi.BlkRequestType, hw.BlkRequestType, "VIRTIO_BLK_"),
    (uapi.BlkStatus, hw.BlkStatus, "VIRTIO_BLK_"),
    (smmuv3.EventId, hw.EventId, ""),
    (smmuv3.EventClass, hw.EventClass, "CLASS_"),
])
def test_python_enums_are_the_headers_values(python_enum, c_enum, prefix) -> None:
    assert {m.name: m.value for m in python_enum} == {
        m.name.removeprefix(prefix): int(m) for m in c_enum}
    if not issubclass(python_enum, enum.IntFlag):
        with pytest.raises(ValueError):
            python_enum(0x7FFF_FFFF)  # a plain Python enum: unknown values are refused


def test_flag_enums_combine_as_flags() -> None:
    for flags in (uapi.MapFlag, uapi.FaultFlag, uapi.ExtFaultFlag, uapi.InvalidateCache,
                  uapi.InvalidateFlag, uapi.DeviceStatus):
        assert issubclass(flags, enum.IntFlag)
    assert uapi.MapFlag.READ | uapi.MapFlag.WRITE == 3
    assert isinstance(uapi.MapFlag.READ | uapi.MapFlag.WRITE, uapi.MapFlag)
    assert (uapi.MapFlag.READ | uapi.MapFlag.WRITE).name == "READ|WRITE"


def test_values_match_the_linux_header_and_the_architecture() -> None:
    assert Status.S_OK == 0 and Status.S_NOMEM == 8
    assert RequestType.VIRTIO_IOMMU_T_ATTACH == 1
    assert RequestType.VIRTIO_IOMMU_T_PROBE == 5
    assert uapi.Feature.F_BYPASS_CONFIG == 6
    assert uapi.MapFlag.MMIO == 1 << 2
    assert uapi.FaultFlag.ADDRESS == 1 << 8
    assert uapi.VIRTIO_ID_IOMMU == 23
    assert uapi.NUM_QUEUES == 2
    assert uapi.CONFIG_SIZE == 40  # struct virtio_iommu_config
    assert uapi.FAULT_RECORD_SIZE == 24  # struct virtio_iommu_fault
    assert (uapi.PROBE_PROPERTY_HEADER_SIZE, uapi.RESV_MEM_PROPERTY_SIZE) == (4, 24)
    assert EventId.C_BAD_STE == 0x04 and EventId.C_BAD_CD == 0x0A
    assert EventId.F_TRANSLATION == 0x10 and EventId.F_PERMISSION == 0x13
    assert smmuv3.EVENT_RECORD_SIZE == 32


def test_virtio_pci_and_blk_values_match_the_linux_headers() -> None:
    """include/uapi/linux/virtio_config.h, virtio_ring.h, virtio_pci.h, virtio_blk.h."""
    assert (uapi.VIRTIO_F_VERSION_1, uapi.VIRTIO_F_ACCESS_PLATFORM) == (32, 33)
    assert uapi.RingFeature.F_INDIRECT_DESC == 28 and uapi.DeviceStatus.NEEDS_RESET == 0x40
    assert uapi.VirtioPciCapType.PCI_CFG == 5 and uapi.CommonCfg.Q_USEDHI == 52
    assert uapi.BlkFeature.F_FLUSH == 9 and uapi.BlkFeature.F_WRITE_ZEROES == 14
    assert uapi.BlkRequestType.T_GET_ID == 8 and uapi.BlkRequestType.T_DISCARD == 11
    assert uapi.BlkStatus.S_UNSUPP == 2 and hw.VIRTIO_ID_BLOCK == 2
    assert (hw.VIRTIO_PCI_CAP_SIZE, hw.VIRTIO_PCI_NOTIFY_CAP_SIZE, hw.VIRTIO_PCI_CFG_CAP_SIZE) \
        == (16, 20, 20)
    assert (hw.VIRTIO_PCI_COMMON_CFG_SIZE, hw.VIRTIO_PCI_MODERN_COMMON_CFG_SIZE) == (0x38, 0x40)
    assert (hw.VIRTIO_BLK_CONFIG_SIZE, hw.VIRTIO_BLK_OUTHDR_SIZE) == (96, 16)
    assert hw.VIRTIO_BLK_DISCARD_SEG_SIZE == 16 and hw.VIRTIO_MSI_NO_VECTOR == 0xFFFF
    raw = hw.encode_virtio_blk_config(131072, 254, 512)
    assert raw[:8] == (131072).to_bytes(8, "little") and raw[12:16] == (254).to_bytes(4, "little")
    assert raw[20:24] == (512).to_bytes(4, "little")


def test_event_sets_come_from_the_data_plane() -> None:
    assert CONFIG_EVENTS == {EventId.C_BAD_STE, EventId.C_BAD_CD, EventId.C_BAD_SUBSTREAMID}
    assert {EventId.F_TRANSLATION, EventId.F_PERMISSION, EventId.F_WALK_EABT} <= ADDRESS_EVENTS
    assert EventId.C_BAD_STE not in ADDRESS_EVENTS
    assert FETCH_EVENTS == {EventId.F_STE_FETCH, EventId.F_CD_FETCH, EventId.F_VMS_FETCH,
                            EventId.F_WALK_EABT}


def test_fault_records_are_packed_from_the_header_layout() -> None:
    record = FaultRecord(2, 0x103, 256, 0xDEAD_B000, pasid=7, grpid=0x1FF)
    raw = record.encode()
    assert len(raw) == uapi.FAULT_RECORD_SIZE
    assert raw == (bytes([2, 0, 0, 0]) + (0x103).to_bytes(4, "little")
                   + (256).to_bytes(4, "little") + bytes(4)
                   + (0xDEAD_B000).to_bytes(8, "little"))
    extended = record.encode(extended=True)
    assert len(extended) == uapi.EXT_FAULT_RECORD_SIZE
    assert extended[12:16] == (7).to_bytes(4, "little")  # the PASID in reserved1
    assert extended[24:26] == (0x1FF).to_bytes(2, "little")
    assert FaultRecord.decode(raw) == FaultRecord(2, 0x103, 256, 0xDEAD_B000)


def test_the_device_config_and_probe_property_match_the_header_layouts() -> None:
    """VirtioIommuDevice still packs these two with struct formats of its own; until it uses
    the data plane's packers, they must give the same bytes."""
    config = DeviceConfig(page_size_mask=0xFFFF_F000, input_range=(0x1000, 0xFFFF_FFFF_FFFF),
                          domain_range=(3, 0x1234), probe_size=256, bypass=True)
    device = VirtioIommuDevice([1], config)
    assert device.config_bytes() == hw.encode_config(
        config.page_size_mask, config.input_range, config.domain_range, config.probe_size,
        config.bypass)
    assert hw.CONFIG_BYPASS_OFFSET == 36
    device.write_config(hw.CONFIG_BYPASS_OFFSET, b"\x00")
    assert not device.bypass
    assert device.probe_properties() == hw.encode_resv_mem(
        uapi.ResvMemSubtype.MSI, *config.resv_msi)
