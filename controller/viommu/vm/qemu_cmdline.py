"""A Machine's QEMU command line: the platform's machine (q35 or virt) with the guest's RAM in
a shared memfd, the serial console and the QMP monitor on unix sockets, the guest kernel, the
vIOMMU (ours over vhost-user, described by an ACPI VIOT on q35 or in the device tree on virt;
QEMU's own virtio-iommu-pci; or none), the PCIe root ports with the profile's endpoints, and
the NIC.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from viommu import uapi
from viommu.vm.boot import GuestBoot
from viommu.vm.disks import DISK_DEVICE, qemu_device
from viommu.vm.profile import NetworkSpec, Profile


@dataclasses.dataclass(frozen=True)
class Nic:
    """The VM's NIC, on a tap of its network segment that QEMU inherits as an fd."""

    spec: NetworkSpec
    tap_fd: int
    tap_index: int  # the tap's place on the segment, which makes its MAC unique there


@dataclasses.dataclass(frozen=True)
class QemuCommandLine:
    profile: Profile
    name: str
    accel: str
    serial_socket: str
    qmp_socket: str
    vhost_socket: str
    viot: Path  # the VIOT table file (ours on q35), written before QEMU starts
    boot: GuestBoot
    dtb: Path | None = None  # the device tree (ours on virt), written before QEMU starts
    # Detached (`viommu up`): QEMU logs the console itself, to this file, and its QMP monitor
    # listens for whoever attaches. Otherwise we log the console and QEMU connects to our QMP.
    detached_console_log: Path | None = None
    nic: Nic | None = None

    @property
    def detached(self) -> bool:
        return self.detached_console_log is not None

    def args(self) -> list[str]:
        return [self.boot.qemu, "-name", self.name, "-nodefaults", "-no-user-config",
                *self.machine_args(), *self.console_args(), *self.kernel_args(),
                *self.iommu_args(), *self.root_port_args(), *self.endpoint_args(),
                *self.nic_args(), *self.profile.extra_args]

    def machine_args(self, extra: str = "") -> list[str]:
        p = self.profile
        board = self.boot.platform
        mem = f"{p.memory_mib}M"
        return ["-machine", f"{board.machine},memory-backend=mem{extra}", "-accel", self.accel,
                "-cpu", "host" if self.accel == "kvm" else board.tcg_cpu,
                "-smp", str(p.cpus), "-m", mem,
                # vhost-user needs guest RAM it can map: a shared memfd.
                "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                "-display", "none"]

    def dump_dtb_command(self, out: Path) -> list[str]:
        """QEMU with this machine, writing the device tree it would boot with to `out`."""
        return [self.boot.qemu, "-nodefaults", "-no-user-config",
                *self.machine_args(f",dumpdtb={out}")]

    def console_args(self) -> list[str]:
        # The serial socket waits for its client (wait=on): no console output is lost.
        serial = f"socket,id=serial,path={self.serial_socket},server=on,wait=on"
        monitor = f"socket,id=mon,path={self.qmp_socket}"
        if self.detached:
            serial += f",logfile={self.detached_console_log},logappend=on"
            monitor += ",server=on,wait=off"
        return ["-chardev", serial, "-serial", "chardev:serial",
                "-chardev", monitor, "-mon", "chardev=mon,mode=control"]

    def kernel_args(self) -> list[str]:
        image = self.boot.image
        dtb = ["-dtb", str(self.dtb)] if self.dtb is not None else []
        return ["-kernel", str(image.kernel.image), "-initrd", str(image.initramfs),
                "-append", self.boot.cmdline, *dtb]

    def iommu_args(self) -> list[str]:
        p = self.profile
        if p.iommu == "none":
            return []
        if p.iommu == "qemu":
            return ["-device", f"virtio-iommu-pci,bus=pcie.0,addr={p.iommu_addr:#x}"]
        # The generic vhost-user device, told it is a virtio-iommu (virtio spec 5.13): its
        # device ID, its queues (requestq, eventq) and the size of its config space.
        viot = ["-acpitable", f"file={self.viot}"] if self.boot.platform.topology == "viot" else []
        return ["-chardev", f"socket,id=viommu,path={self.vhost_socket}",
                "-device", "vhost-user-test-device-pci,chardev=viommu,"
                           f"virtio-id={uapi.VIRTIO_ID_IOMMU},num_vqs={uapi.NUM_QUEUES},"
                           f"config_size={uapi.CONFIG_SIZE},bus=pcie.0,addr={p.iommu_addr:#x}",
                *viot]

    def root_port_args(self) -> list[str]:
        p = self.profile
        args = []
        for port in range(p.root_ports):
            args += ["-device", f"pcie-root-port,id=rp{port},chassis={port + 1},"
                                f"slot={port + 1},bus=pcie.0,"
                                f"addr={p.root_port_first_addr + port:#x}"]
        return args

    def endpoint_args(self) -> list[str]:
        args = []
        for ep in self.profile.endpoints:
            if ep.device == DISK_DEVICE:  # served by the backend (viommu.vm.disks)
                args += qemu_device(ep, f"rp{ep.port}", Path(self.vhost_socket).parent,
                                    self.profile.endpoint_id(ep))
                continue
            opts = "".join(f",{k}={v}" for k, v in ep.options.items())
            args += ["-device", f"{ep.device},id={ep.name},bus=rp{ep.port}{opts}"]
        return args

    def nic_args(self) -> list[str]:
        """On pcie.0, outside the VIOT's ranges and so outside the vIOMMU."""
        if self.nic is None:
            return []
        spec = self.nic.spec
        return ["-netdev", f"tap,id={spec.name},fd={self.nic.tap_fd}",
                "-device", f"{spec.model},netdev={spec.name},bus=pcie.0,addr={spec.addr:#x},"
                           f"mac={spec.mac(self.nic.tap_index)}"]
