"""A kernel the developer built, booted behind the vIOMMU: given as a build tree (as `vng`
takes one) or as an image with a `make modules_install` tree, it is found, checked and booted,
and the fault-injection checks hold on it.

No compile in CI: the build tree is laid out from the Debian kernel's own files the way
`make` leaves them (arch/x86/boot/bzImage, .config, include/config/kernel.release, the .ko
files where modules.order lists them, uncompressed), and the image + modules variant the way
`make modules_install INSTALL_MOD_PATH=DIR` does (DIR/lib/modules/<release>/...).
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
from pathlib import Path

import pytest

from viommu.provision import kconfig
from viommu.provision.arch import get_arch
from viommu.provision.initramfs import find_image
from viommu.provision.kernels import resolve_kernel
from viommu.vm.boot import KernelRefused
from viommu.vm.machine import Machine

# The run's architecture (--viommu-arch sets VIOMMU_ARCH): the tree is laid out for it.
ARCH = get_arch(os.environ.get("VIOMMU_ARCH") or "x86_64")
EP = 0x100


@pytest.fixture(scope="module")
def debian_kernel():
    return resolve_kernel("7", ARCH)


def lay_out_build_tree(kernel, tree: Path, drop: tuple[str, ...] = ()) -> Path:
    """What a built tree holds, from a packaged kernel; `drop` options are left out of
    .config and their modules are not built."""
    (tree / ARCH.tree_image).parent.mkdir(parents=True)
    shutil.copyfile(kernel.image, tree / ARCH.tree_image)
    (tree / "include/config").mkdir(parents=True)
    (tree / "include/config/kernel.release").write_text(kernel.release + "\n")
    config = kernel.config.read_text()
    for option in drop:
        config = re.sub(rf"^CONFIG_{option}=.*$", f"# CONFIG_{option} is not set", config,
                        flags=re.M)
    (tree / ".config").write_text(config)
    dropped = {kconfig.module_of(option) for option in drop}
    order = []
    for name, ko in sorted(kernel.module_files().items()):
        if name in dropped or not name.startswith(("virtio", "vfio", "irqbypass", "failover",
                                                     "net_failover")):
            continue
        built = tree / ko.relative_to(kernel.modules_dir / "kernel").with_suffix("")
        built.parent.mkdir(parents=True, exist_ok=True)
        data = ko.read_bytes()
        built.write_bytes(lzma.decompress(data) if ko.name.endswith(".xz") else data)
        order.append(str(built.relative_to(tree).with_suffix(".o")))
    (tree / "modules.order").write_text("\n".join(order) + "\n")
    shutil.copyfile(kernel.modules_dir / "modules.builtin", tree / "modules.builtin")
    return tree


def check_fault_injection(vm: Machine) -> None:
    for event, args, line in (("C_BAD_STE", {}, f"unknown fault from EP {EP}"),
                              ("C_BAD_CD", {"ssid": 1}, f"unknown fault from EP {EP}"),
                              ("F_TRANSLATION", {"address": 0x10000, "access": "read"},
                               f"page fault from EP {EP} at 0x10000 [R]")):
        mark = vm.mark()
        assert vm.inject(event, EP, **args)["delivered"] == 1
        vm.wait_line(rf"virtio_iommu virtio\d+: {re.escape(line)}$", since=mark)


def test_a_kernel_build_tree_boots_behind_the_viommu(debian_kernel, tmp_path) -> None:
    tree = lay_out_build_tree(debian_kernel, tmp_path / "linux")
    with Machine("default", workdir=tmp_path / "vm", name="tree", kernel=str(tree)) as vm:
        assert vm.boot.image.kernel.origin == f"build tree {tree}"
        assert vm.run("uname -r").check().output.strip() == debian_kernel.release
        assert "virtio_iommu" in vm.boot.image.modules  # taken from the tree, as built
        check_fault_injection(vm)


def test_an_image_with_a_modules_install_tree_boots_behind_the_viommu(
        debian_kernel, tmp_path) -> None:
    image = tmp_path / Path(ARCH.tree_image).name
    shutil.copyfile(debian_kernel.image, image)
    modules = tmp_path / "install/lib/modules" / debian_kernel.release
    shutil.copytree(debian_kernel.modules_dir, modules)
    shutil.copyfile(debian_kernel.config, image.parent / f"config-{debian_kernel.release}")
    with Machine("default", workdir=tmp_path / "vm", name="image", kernel=str(image),
                 modules=modules) as vm:
        assert vm.run("uname -r").check().output.strip() == debian_kernel.release
        check_fault_injection(vm)


def test_a_kernel_without_virtio_iommu_is_refused_before_it_boots(
        debian_kernel, tmp_path) -> None:
    tree = lay_out_build_tree(debian_kernel, tmp_path / "linux", drop=("VIRTIO_IOMMU",))
    vm = Machine("default", workdir=tmp_path / "vm", name="refused", kernel=str(tree))
    with pytest.raises(KernelRefused, match=r"lacks what viommu needs: CONFIG_VIRTIO_IOMMU "
                                            r"\(the guest's virtio-iommu driver\)"):
        vm.launch()
    assert vm.qemu_pid is None  # nothing was started
    assert find_image(resolve_kernel(str(tree), ARCH), ARCH) is None  # nor an initramfs built
