"""What set-up provides, without a network: kernel SPECs (build trees, images with modules),
the configuration pre-flight (including IKCONFIG read from an image), module load order from
the modules' own dependencies, the initramfs archive, and where the cache lives."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import pytest

from viommu.provision import initramfs, kconfig
from viommu.provision.arch import get_arch
from viommu.provision.cache import cache_root
from viommu.provision.initramfs import Cpio, ensure_image, find_image, module_load_order
from viommu.provision.kernels import read_release, resolve_kernel

X86 = get_arch("x86_64")
GOOD_CONFIG = """\
CONFIG_PCI=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_IOMMU=m
CONFIG_ACPI_VIOT=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_DEVTMPFS=y
CONFIG_PCIEPORTBUS=y
CONFIG_HOTPLUG_PCI_PCIE=y
CONFIG_VFIO=m
CONFIG_VFIO_IOMMU_TYPE1=m
CONFIG_VFIO_PCI=m
CONFIG_VIRTIO_BLK=y
CONFIG_VFAT_FS=y
CONFIG_VIRTIO_NET=y
"""


def bzimage(release: str) -> bytes:
    """Enough of an x86 bzImage for its setup header's kernel_version."""
    data = bytearray(0x800)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    version = f"{release} (builder@host) #1 SMP".encode()
    data[0x400:0x400 + len(version)] = version
    return bytes(data)


def ko(name: str, depends: str = "") -> bytes:
    return b"\x7fELF" + f"\0name={name}\0depends={depends}\0".encode()


def build_tree(tmp_path: Path, config: str = GOOD_CONFIG) -> Path:
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "arch/x86/boot/bzImage").write_bytes(bzimage("6.18.0-rc1-dirty"))
    (tree / "include/config").mkdir(parents=True)
    (tree / "include/config/kernel.release").write_text("6.18.0-rc1-dirty\n")
    (tree / ".config").write_text(config)
    modules = {"drivers/iommu/virtio-iommu.o": ko("virtio_iommu"),
               "drivers/vfio/vfio.o": ko("vfio", "irqbypass"),
               "virt/lib/irqbypass.o": ko("irqbypass"),
               "drivers/vfio/vfio_iommu_type1.o": ko("vfio_iommu_type1", "vfio"),
               "drivers/vfio/pci/vfio-pci.o": ko("vfio_pci", "vfio_pci_core,vfio"),
               "drivers/vfio/pci/vfio-pci-core.o": ko("vfio_pci_core", "vfio,irqbypass")}
    for obj, data in modules.items():
        path = tree / obj.replace(".o", ".ko")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (tree / "modules.order").write_text("\n".join(modules) + "\n")
    (tree / "modules.builtin").write_text("kernel/drivers/net/virtio_net.ko\n")
    return tree


def test_a_build_tree_is_a_kernel_with_its_release_config_and_built_modules(tmp_path) -> None:
    kernel = resolve_kernel(str(build_tree(tmp_path)), X86)
    assert kernel.release == "6.18.0-rc1-dirty"
    assert kernel.origin.startswith("build tree ")
    assert set(kernel.module_files()) == {"virtio_iommu", "vfio", "irqbypass",
                                          "vfio_iommu_type1", "vfio_pci", "vfio_pci_core"}
    assert kernel.builtin_modules() == {"virtio_net"}


def test_modules_load_after_their_dependencies_and_built_in_ones_are_skipped(tmp_path) -> None:
    kernel = resolve_kernel(str(build_tree(tmp_path)), X86)
    order = module_load_order(kernel, ["virtio_iommu", "vfio_pci", "virtio_net", "virtio_blk"])
    assert order == ["virtio_iommu", "irqbypass", "vfio", "vfio_pci_core", "vfio_pci"]


def test_a_module_rebuilt_without_the_image_gets_a_new_initramfs(tmp_path, monkeypatch) -> None:
    # The developer's loop with a driver built =m: `make modules` remakes virtio-iommu.ko and
    # leaves bzImage alone; the next boot must load the new module, not the cached one.
    monkeypatch.setenv("VIOMMU_CACHE", str(tmp_path / "cache"))
    (tmp_path / "busybox").write_bytes(b"busybox")
    monkeypatch.setattr(initramfs, "busybox", lambda arch: tmp_path / "busybox")
    monkeypatch.setattr(initramfs, "guest_tools", lambda arch: {})
    tree = build_tree(tmp_path)
    kernel = resolve_kernel(str(tree), X86)
    first = ensure_image(kernel, X86)
    assert find_image(kernel, X86) == first  # unchanged: found again, not rebuilt
    (tree / "drivers/iommu/virtio-iommu.ko").write_bytes(ko("virtio_iommu") + b"\0fixed=1")
    assert find_image(kernel, X86) is None
    second = ensure_image(kernel, X86)
    assert b"fixed=1" in gzip.decompress(second.initramfs.read_bytes())


def test_an_image_with_a_modules_tree_takes_its_release_from_the_tree(tmp_path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage("6.18.0"))
    modules = tmp_path / "lib/modules/6.18.0"
    (modules / "kernel/drivers/iommu").mkdir(parents=True)
    (modules / "kernel/drivers/iommu/virtio-iommu.ko.xz").write_bytes(
        lzma.compress(ko("virtio_iommu")))
    kernel = resolve_kernel(str(image), X86, modules=modules)
    assert (kernel.release, list(kernel.module_files())) == ("6.18.0", ["virtio_iommu"])
    assert module_load_order(kernel, ["virtio_iommu"]) == ["virtio_iommu"]


def test_an_image_alone_reads_its_release_from_the_setup_header(tmp_path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage("6.18.0-custom"))
    assert read_release(image) == "6.18.0-custom"
    assert resolve_kernel(str(image), X86).release == "6.18.0-custom"


def test_an_unknown_spec_names_the_debian_series_and_what_a_path_must_be() -> None:
    with pytest.raises(ValueError, match=r"not a Debian series \(7, 6\.12, 6\.1\) nor an"):
        resolve_kernel("5.4", X86)


def test_a_build_tree_without_an_image_says_to_build_it(tmp_path) -> None:
    (tmp_path / "linux").mkdir()
    with pytest.raises(ValueError, match="has no arch/x86/boot/bzImage: build the kernel"):
        resolve_kernel(str(tmp_path / "linux"), X86)


def test_a_complete_configuration_misses_nothing(tmp_path) -> None:
    kernel = resolve_kernel(str(build_tree(tmp_path)), X86)
    assert kconfig.missing(kernel, kconfig.read_config(kernel)) == []


def test_a_kernel_without_virtio_iommu_is_refused_naming_the_option(tmp_path) -> None:
    config = GOOD_CONFIG.replace("CONFIG_VIRTIO_IOMMU=m\n", "# CONFIG_VIRTIO_IOMMU is not set\n")
    kernel = resolve_kernel(str(build_tree(tmp_path, config)), X86)
    gaps = kconfig.missing(kernel, kconfig.read_config(kernel))
    assert [g.option for g in gaps] == ["VIRTIO_IOMMU"]
    assert "CONFIG_VIRTIO_IOMMU (the guest's virtio-iommu driver)" in kconfig.explain(kernel,
                                                                                       gaps)


def test_a_module_option_without_its_module_file_is_missing(tmp_path) -> None:
    tree = build_tree(tmp_path)
    (tree / "drivers/iommu/virtio-iommu.ko").unlink()
    kernel = resolve_kernel(str(tree), X86)
    assert [g.option for g in kconfig.missing(kernel, kconfig.read_config(kernel))] == [
        "VIRTIO_IOMMU"]


def test_features_narrow_what_is_required(tmp_path) -> None:
    config = GOOD_CONFIG.replace("CONFIG_VFIO_PCI=m\n", "")
    kernel = resolve_kernel(str(build_tree(tmp_path, config)), X86)
    cfg = kconfig.read_config(kernel)
    assert kconfig.missing(kernel, cfg, features=[]) == []
    assert [g.option for g in kconfig.missing(kernel, cfg, features=["vfio"])] == ["VFIO_PCI"]


def test_the_fragment_turns_every_needed_option_on() -> None:
    fragment = kconfig.fragment("x86_64")
    options = {r.option for r in kconfig.requirements("x86_64")}
    assert {line.removeprefix("CONFIG_").removesuffix("=y") for line in fragment.splitlines()
            if line.startswith("CONFIG_")} == options
    assert "CONFIG_ACPI_VIOT=y" in fragment and "CONFIG_OF=y" not in fragment
    assert "CONFIG_OF=y" in kconfig.fragment("aarch64")


@pytest.mark.parametrize("compress", [lambda b: b, gzip.compress, lzma.compress],
                         ids=["plain", "gzip", "xz"])
def test_the_configuration_embedded_in_an_image_is_found(tmp_path, compress) -> None:
    payload = (b"\0" * 100 + b"IKCFG_ST" + gzip.compress(GOOD_CONFIG.encode()) + b"IKCFG_ED"
               + b"\0" * 100)
    image = tmp_path / "Image"
    image.write_bytes(b"boot stub" + compress(payload))
    assert kconfig.parse_config(kconfig.ikconfig(image))["VIRTIO_IOMMU"] == "m"


def test_an_image_without_ikconfig_has_no_configuration(tmp_path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage("6.18.0"))
    assert resolve_kernel(str(image), X86).config is None
    assert kconfig.read_config(resolve_kernel(str(image), X86)) is None


def test_cpio_entries_are_newc_with_zero_times_and_owners() -> None:
    cpio = Cpio()
    cpio.add("init", 0o100755, b"#!/bin/sh\n")
    data = cpio.finish()
    assert data.startswith(b"070701")
    fields = [int(data[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    assert fields[1] == 0o100755 and fields[2:4] == [0, 0] and fields[5] == 0  # uid gid mtime
    assert fields[6] == len(b"#!/bin/sh\n") and fields[11] == len(b"init\0")
    assert len(data) % 4 == 0 and data.rstrip(b"\0").endswith(b"TRAILER!!!")


def test_the_cache_is_viommu_cache_else_under_xdg_cache_home(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VIOMMU_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("VIOMMU_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "viommu"
