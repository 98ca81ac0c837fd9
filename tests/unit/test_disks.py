"""viommu.vm.disks without a VM: sizes, a profile's disks and their QEMU device, what
endpoint-create is asked, the MSI-X choice by QEMU version, the kernel arguments a Machine
or a profile appends, and `viommu attach --blk`'s arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from viommu.cli.main import build_parser
from viommu.vm import disks
from viommu.vm.boot import kernel_cmdline
from viommu.vm.disks import DiskSpec, parse_size
from viommu.vm.machine import Machine
from viommu.vm.platforms import platform
from viommu.vm.profile import EndpointSpec, load_profile


@pytest.mark.parametrize(("text", "size"), [("256M", 256 << 20), ("1G", 1 << 30),
                                            ("4096", 4096), ("64MiB", 64 << 20), (512, 512)])
def test_sizes_take_binary_units(text, size: int) -> None:
    assert parse_size(text) == size


def test_a_size_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError, match="a size is a number"):
        parse_size("lots")


def test_profile_options_become_a_disk_spec_and_unknown_ones_are_refused() -> None:
    spec = DiskSpec.from_options({"size": "16M", "read-only": True, "msix": False})
    assert (spec.size, spec.read_only, spec.msix, spec.indirect) == (16 << 20, True, False,
                                                                      True)
    with pytest.raises(ValueError, match="unknown viommu-blk options"):
        DiskSpec.from_options({"sizes": "1M"})


class FakeBoot:
    qemu = "/usr/bin/false"


class FakeVm:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def prepare(self) -> FakeBoot:
        return FakeBoot()


def test_endpoint_create_arguments_put_the_image_in_the_work_directory(tmp_path: Path) -> None:
    args = DiskSpec(size=1 << 20, msix=True).create_args(FakeVm(tmp_path), "disk2")
    assert args == {"kind": "blk", "image": str(tmp_path / "disk-disk2.img"), "size": 1 << 20,
                    "read_only": False, "indirect": True, "msix": True}
    args = DiskSpec(image="rel.img", msix=False).create_args(FakeVm(tmp_path), "d")
    assert (args["image"], args["msix"]) == (str(tmp_path / "rel.img"), False)


def test_msix_is_chosen_only_where_qemu_unplugs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for version, safe in (((11, 1), False), ((11, 0), False), ((11, 2), True), (None, False)):
        disks.msix_unplugs_safely.cache_clear()
        monkeypatch.setattr(disks, "qemu_version", lambda binary, v=version: v)
        assert disks.msix_unplugs_safely("qemu") is safe
    disks.msix_unplugs_safely.cache_clear()


def test_a_profile_disk_is_a_vfio_user_pci_device_on_its_socket(tmp_path: Path) -> None:
    spec = EndpointSpec("disk0", 1, disks.DISK_DEVICE, {"size": "16M"})
    args = disks.qemu_device(spec, "rp1", tmp_path, 0x200)
    assert args[0] == "-device" and json.loads(args[1]) == {
        "driver": "vfio-user-pci", "id": "disk0", "bus": "rp1",
        "socket": {"type": "unix", "path": str(tmp_path / "endpoint-200.sock")}}


def test_kernel_arguments_are_appended_by_the_machine_and_the_profile(tmp_path: Path) -> None:
    vm = Machine("default", workdir=tmp_path, accel="tcg", kernel_args="iommu.strict=1")
    assert vm.profile.cmdline_append == "iommu.strict=1"
    line = kernel_cmdline(vm.profile, platform("x86_64"))
    assert line.endswith(" iommu.strict=1") and "memmap=" in line
    profile = tmp_path / "p.toml"
    profile.write_text('[kernel]\nappend = "iommu.passthrough=0"\n'
                       '[[endpoints]]\nname = "d"\nport = 1\ndevice = "viommu-blk"\n')
    loaded = load_profile(profile)
    assert loaded.cmdline_append == "iommu.passthrough=0"
    assert disks.profile_disks(loaded) == [loaded.endpoints[0]]
    both = Machine(loaded, workdir=tmp_path, accel="tcg", kernel_args="iommu.strict=1")
    assert both.profile.cmdline_append == "iommu.passthrough=0 iommu.strict=1"
    assert both._features() == ["virtio-blk"]


def test_viommu_attach_takes_blk_options() -> None:
    args = build_parser().parse_args(["attach", "vm", "--port", "2", "--blk", "--size", "256M",
                                      "--read-only", "--image", "x.img"])
    assert (args.blk, args.size, args.read_only, args.image) == (True, 256 << 20, True,
                                                                  "x.img")
