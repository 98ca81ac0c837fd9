"""The machine a guest architecture runs on, and what differs between them for a VM.

- x86_64 runs on q35. The guest learns which endpoints sit behind our vIOMMU from an ACPI VIOT
  table (`-acpitable`; Linux drivers/acpi/viot.c). MSIs go to the LAPIC window, which the
  device reports as a RESV_MEM MSI region so the guest does not map it.
- aarch64 runs on virt (GICv3 with an ITS). QEMU refuses `-acpitable` there ("Option not
  supported for this target"), and it builds a VIOT only for its own virtio-iommu-pci, so the
  topology goes in the device tree instead: QEMU's generated tree with a virtio-iommu node for
  our PCI function and an `iommu-map` on the PCIe host bridge (viommu.vm.devicetree). The MSI
  region reported is the ITS's GITS_TRANSLATER page, as QEMU's virtio-iommu-pci reports it on
  virt (hw/arm/virt.c, virt_machine_device_pre_plug_cb): QEMU delivers an endpoint's MSI
  itself, without our translation, so the guest must write the doorbell's physical address.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Platform:
    arch: str
    machine: str  # QEMU's -machine, before memory-backend=
    tcg_cpu: str  # -cpu under TCG (KVM uses "host")
    console: str  # the guest's serial console device
    topology: str  # "viot" (ACPI table) or "devicetree"
    msi_window: tuple[int, int]  # the RESV_MEM MSI region PROBE reports
    ram_base: int  # where guest RAM starts

    def console_arg(self) -> str:
        return f"console={self.console}"


PLATFORMS = {
    "x86_64": Platform("x86_64", "q35", "max", "ttyS0", "viot", (0xFEE0_0000, 0xFEEF_FFFF), 0),
    # cortex-a57 boots as fast as "max" under TCG and takes 4K and 64K granule kernels.
    "aarch64": Platform("aarch64", "virt,gic-version=3", "cortex-a57", "ttyAMA0", "devicetree",
                        (0x0809_0000, 0x0809_FFFF), 0x4000_0000),
}


def platform(arch: str) -> Platform:
    try:
        return PLATFORMS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; viommu runs {', '.join(PLATFORMS)}"
                         ) from None
