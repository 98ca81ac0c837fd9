"""A Machine's QEMU command line: q35 with the guest's RAM in a shared memfd, the serial
console and the QMP monitor on unix sockets, the guest kernel, the vIOMMU (ours over
vhost-user with its ACPI VIOT, QEMU's own virtio-iommu-pci, or none), the PCIe root ports
with the profile's endpoints, and the NIC.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from viommu import uapi
from viommu.vm import paths
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
    viot: Path  # the VIOT table file (ours only), written before QEMU starts
    # Detached (`viommu up`): QEMU logs the console itself, to this file, and its QMP monitor
    # listens for whoever attaches. Otherwise we log the console and QEMU connects to our QMP.
    detached_console_log: Path | None = None
    nic: Nic | None = None

    @property
    def detached(self) -> bool:
        return self.detached_console_log is not None

    def args(self) -> list[str]:
        return [paths.qemu_binary(), "-name", self.name, "-nodefaults", "-no-user-config",
                *self.machine_args(), *self.console_args(), *self.kernel_args(),
                *self.iommu_args(), *self.root_port_args(), *self.endpoint_args(),
                *self.nic_args(), *self.profile.extra_args]

    def machine_args(self) -> list[str]:
        p = self.profile
        mem = f"{p.memory_mib}M"
        return ["-machine", "q35,memory-backend=mem", "-accel", self.accel,
                "-cpu", "host" if self.accel == "kvm" else "max",
                "-smp", str(p.cpus), "-m", mem,
                # vhost-user needs guest RAM it can map: a shared memfd.
                "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                "-display", "none"]

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
        kernel, initrd, _ = paths.guest_image()
        return ["-kernel", str(kernel), "-initrd", str(initrd),
                "-append", self.profile.kernel_cmdline]

    def iommu_args(self) -> list[str]:
        p = self.profile
        if p.iommu == "none":
            return []
        if p.iommu == "qemu":
            return ["-device", f"virtio-iommu-pci,bus=pcie.0,addr={p.iommu_addr:#x}"]
        # The generic vhost-user device, told it is a virtio-iommu (virtio spec 5.13): its
        # device ID, its queues (requestq, eventq) and the size of its config space.
        return ["-chardev", f"socket,id=viommu,path={self.vhost_socket}",
                "-device", "vhost-user-test-device-pci,chardev=viommu,"
                           f"virtio-id={uapi.VIRTIO_ID_IOMMU},num_vqs={uapi.NUM_QUEUES},"
                           f"config_size={uapi.CONFIG_SIZE},bus=pcie.0,addr={p.iommu_addr:#x}",
                "-acpitable", f"file={self.viot}"]

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
