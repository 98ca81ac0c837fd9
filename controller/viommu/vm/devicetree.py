"""The topology of an aarch64 guest, in its device tree: which endpoints our vIOMMU translates.

QEMU's virt machine generates its device tree; it describes an IOMMU only for its own
virtio-iommu-pci. So the Machine dumps the tree QEMU would boot with (`-machine
virt,dumpdtb=FILE`, same machine, CPU and memory options), adds what QEMU adds for its own
device (hw/arm/virt.c, create_virtio_iommu_dt_bindings) for our PCI function, and boots with
`-dtb`. QEMU still fills in /chosen (command line, initrd) and the memory node.

The bindings (Linux Documentation/devicetree/bindings/virtio/pci-iommu.yaml and
bindings/pci/pci-iommu.yaml): a child of the PCIe host bridge at the IOMMU's devfn, with
`compatible = "virtio,pci-iommu", "pci1af4,1057"` and `#iommu-cells = <1>`, and on the bridge
`iommu-map = <rid-base iommu-phandle iommu-base length>...`. The map names only the root
ports' buses, as the VIOT does on x86: devices QEMU emulates itself stay outside the IOMMU.
Edited with pylibfdt, the Python binding of the device-tree compiler project's libfdt.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import libfdt

from viommu.vm.viot import PciRange

# virtio-pci devices are 1af4:(0x1040 + virtio device ID); virtio-iommu's ID is 23.
COMPATIBLE = b"virtio,pci-iommu\0pci1af4,1057\0"
PCIE_HOST = b"pci-host-ecam-generic"


class DeviceTreeError(ValueError):
    """QEMU's tree is not what a virt machine's is (no PCIe host bridge)."""


def write_dtb(dump_command: Sequence[str], out: Path, iommu_bdf: int,
              ranges: Sequence[PciRange], reserved: tuple[int, int] | None) -> Path:
    """Dump QEMU's tree (`dump_command` ends in a -machine option with dumpdtb=), add our
    vIOMMU and the reserved range (base, size) to it, write it to `out`."""
    raw = out.with_suffix(".qemu.dtb")
    result = subprocess.run([*dump_command, "-S", "-display", "none"], capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0 or not raw.exists():
        raise DeviceTreeError(f"QEMU did not dump its device tree: {result.stderr.strip()}")
    dtb = add_viommu(raw.read_bytes(), iommu_bdf, ranges)
    if reserved is not None and reserved[1]:
        dtb = reserve(dtb, *reserved)
    out.write_bytes(dtb)
    return out


def reserve(dtb: bytes, base: int, size: int) -> bytes:
    """Keep the kernel off [base, base+size): a `no-map` child of /reserved-memory (Linux
    Documentation/devicetree/bindings/reserved-memory), as memmap= does on x86."""
    fdt = libfdt.Fdt(bytes(dtb) + bytes(4096))
    fdt.resize(len(dtb) + 4096)
    parent = fdt.path_offset("/reserved-memory", quiet=(libfdt.NOTFOUND,))
    if parent < 0:
        parent = fdt.add_subnode(0, "reserved-memory")
        fdt.setprop_u32(parent, "#address-cells", 2)
        fdt.setprop_u32(parent, "#size-cells", 2)
        fdt.setprop(parent, "ranges", b"")
    node = fdt.add_subnode(parent, f"viommu-tables@{base:x}")
    fdt.setprop(node, "reg", struct.pack(">4I", base >> 32, base & 0xFFFF_FFFF, size >> 32,
                                         size & 0xFFFF_FFFF))
    fdt.setprop(node, "no-map", b"")
    fdt.pack()
    return bytes(fdt.as_bytearray())


def add_viommu(dtb: bytes, iommu_bdf: int, ranges: Sequence[PciRange]) -> bytes:
    """`dtb` with a virtio-iommu node for the PCI function `iommu_bdf` on the host bridge's
    bus 0, translating the requester IDs of `ranges` (endpoint ID = requester ID)."""
    fdt = libfdt.Fdt(bytes(dtb) + bytes(4096))
    fdt.resize(len(dtb) + 4096)
    phandle = max((fdt.get_phandle(node) for node in _nodes(fdt)), default=0) + 1
    bridge = _pcie_host(fdt)
    node = fdt.add_subnode(bridge, f"virtio_iommu@{iommu_bdf >> 3 & 0x1f:x},{iommu_bdf & 7:x}")
    fdt.setprop(node, "compatible", COMPATIBLE)
    # reg: phys.hi with the bus/device/function in bits 23:8 (IEEE 1275 PCI binding), no BAR.
    fdt.setprop(node, "reg", struct.pack(">5I", iommu_bdf << 8, 0, 0, 0, 0))
    fdt.setprop_u32(node, "#iommu-cells", 1)
    fdt.setprop_u32(node, "phandle", phandle)
    bridge = _pcie_host(fdt)  # offsets move when a node is added
    fdt.setprop(bridge, "iommu-map", b"".join(
        struct.pack(">4I", r.bdf_start, phandle, r.endpoint_id(r.bdf_start),
                    r.bdf_end - r.bdf_start + 1) for r in ranges))
    fdt.pack()
    return bytes(fdt.as_bytearray())


def _nodes(fdt: libfdt.Fdt) -> Iterator[int]:
    """Every node's offset, the root first. libfdt ends the walk with a negative depth (or
    FDT_ERR_NOTFOUND), not at a fixed node count."""
    node, depth = 0, 0
    while depth >= 0:
        yield node
        try:
            node, depth = fdt.next_node(node, depth)
        except libfdt.FdtException:
            return


def _pcie_host(fdt: libfdt.Fdt) -> int:
    for node in _nodes(fdt):
        compatible = fdt.getprop(node, "compatible", quiet=(libfdt.NOTFOUND,))
        if not isinstance(compatible, int) and bytes(compatible).startswith(PCIE_HOST):
            return node
    raise DeviceTreeError("QEMU's device tree has no PCIe host bridge "
                          f"({PCIE_HOST.decode()}); is this a virt machine?")
