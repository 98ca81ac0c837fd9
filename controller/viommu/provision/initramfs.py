"""The guest's initramfs, built for one kernel: busybox, the recipe's init (viommu's package
data, viommu.guest_images), the kernel's modules the recipe lists with their dependencies,
and the static C guest tools.

Reproducible: sorted entries, zero timestamps and owners, gzip without a timestamp. An image
is rebuilt only when the recipe, the tools, the kernel image or one of its modules change.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import lzma
import os
import re
import subprocess
from importlib import resources
from pathlib import Path

from viommu.provision.arch import Arch
from viommu.provision.cache import SetupMissing, cache_dir, locked, progress
from viommu.provision.debian import PrivateApt, extract
from viommu.provision.kernels import Kernel

RECIPE_FILES = ("init", "profile", "modules.txt")


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Kernel
    initramfs: Path
    modules: tuple[str, ...]  # loaded at boot, in order


def recipe_dir() -> Path:
    return Path(str(resources.files("viommu.guest_images")))


def tool_sources() -> list[Path]:
    return sorted((recipe_dir() / "tools").glob("*.c"))


def recipe_hash() -> str:
    h = hashlib.sha256()
    for path in [recipe_dir() / name for name in RECIPE_FILES] + tool_sources():
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def image_dir(kernel: Kernel, arch: Arch) -> Path:
    """Where the image of this kernel and recipe lives: one directory per recipe, so that
    checkouts with different recipes sharing the cache never rebuild over each other's
    image (nor over one a running QEMU is reading)."""
    return cache_dir("images", arch.name, f"{kernel.key}-{recipe_hash()}")


def find_image(kernel: Kernel, arch: Arch) -> GuestImage | None:
    """The image already built for this kernel and recipe, if any."""
    manifest = image_dir(kernel, arch) / "manifest.json"
    if not manifest.exists():
        return None
    data = json.loads(manifest.read_text())
    initramfs = manifest.parent / data["initramfs"]
    if data.get("recipe") != recipe_hash() or not initramfs.exists():
        return None
    if data.get("module_files") != module_identities(kernel, data["modules"]):
        return None  # a module rebuilt without the image (a driver built =m, remade)
    return GuestImage(kernel, initramfs, tuple(data["modules"]))


def module_identities(kernel: Kernel, names: list[str]) -> dict[str, str]:
    """Which file each of the image's modules came from, as of now: its size and mtime."""
    files = kernel.module_files()
    identities = {}
    for name in names:
        path = files.get(name)
        stat = path.stat() if path is not None and path.exists() else None
        identities[name] = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "missing"
    return identities


def ensure_image(kernel: Kernel, arch: Arch) -> GuestImage:
    """The initramfs for `kernel`, built if needed (idempotent)."""
    image = find_image(kernel, arch)
    if image is not None:
        return image
    with locked(f"image-{arch.name}-{kernel.key}"):
        return find_image(kernel, arch) or _build_image(kernel, arch)


def _build_image(kernel: Kernel, arch: Arch) -> GuestImage:
    home = image_dir(kernel, arch)
    wanted, params = _recipe_modules()
    order = module_load_order(kernel, wanted)
    progress(f"building the initramfs (kernel {kernel.release}, {arch.name}, modules: "
             f"{', '.join(order) or 'none: all built in'})")
    files = kernel.module_files()
    cpio = Cpio()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", f"lib/modules/{kernel.release}",
              "proc", "sys", "tmp", "run", "root"):
        cpio.add(d, 0o040755)
    cpio.add_device("dev/console", 0o020600, 5, 1)
    cpio.add("bin/busybox", 0o100755, busybox(arch).read_bytes())
    cpio.add("bin/sh", 0o120777, target="busybox")
    cpio.add("init", 0o100755, (recipe_dir() / "init").read_bytes())
    cpio.add("etc/profile", 0o100644, (recipe_dir() / "profile").read_bytes())
    cpio.add("etc/modules", 0o100644,
             "".join(f"{m} {params.get(m, '')}".rstrip() + "\n" for m in order).encode())
    for name, binary in guest_tools(arch).items():
        cpio.add(f"bin/{name}", 0o100755, binary)
    for name in order:
        cpio.add(f"lib/modules/{kernel.release}/{name}.ko", 0o100644, module_bytes(files[name]))
    data = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)
    _write_atomically(home / "initramfs.cpio.gz", data)
    _write_atomically(home / "manifest.json", json.dumps({
        "kernel": kernel.to_dict(), "initramfs": "initramfs.cpio.gz", "modules": order,
        "module_files": module_identities(kernel, order),
        "recipe": recipe_hash(), "initramfs_sha256": hashlib.sha256(data).hexdigest(),
    }, indent=1).encode() + b"\n")
    progress(f"guest image ready ({len(data) // 1024} KiB initramfs)")
    return GuestImage(kernel, home / "initramfs.cpio.gz", tuple(order))


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


def _recipe_modules() -> tuple[list[str], dict[str, str]]:
    lines = [ln.split() for ln in (recipe_dir() / "modules.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    names = [words[0].replace("-", "_") for words in lines]
    return names, {words[0].replace("-", "_"): " ".join(words[1:]) for words in lines}


# --- kernel modules ------------------------------------------------------------------------


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard  # Debian compresses with xz; a user's build may use zstd

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def depends(ko: bytes) -> list[str]:
    """The modules a module needs first (its modinfo `depends=`)."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)", ko)
    return [d.replace("-", "_") for d in match[1].decode().split(",") if d] if match else []


def module_load_order(kernel: Kernel, wanted: list[str]) -> list[str]:
    """The wanted modules the kernel has as modules, after their dependencies; those it has
    built in or lacks are left out (the pre-flight check decides whether that matters)."""
    files = kernel.module_files()
    order: list[str] = []

    def visit(name: str, needed_by: str | None) -> None:
        if name in order:
            return
        if name not in files:
            if needed_by is not None and name not in kernel.builtin_modules():
                raise SetupMissing(f"kernel {kernel.release}: module {name}, which {needed_by} "
                                   "needs, is neither built in nor installed")
            return
        for dep in depends(module_bytes(files[name])):
            visit(dep, name)
        order.append(name)

    for name in wanted:
        visit(name, None)
    return order


# --- busybox and the guest tools -------------------------------------------------------------


def busybox(arch: Arch) -> Path:
    """Debian's static busybox for `arch`, fetched once."""
    home = cache_dir("busybox", arch.name)
    binary = home / "busybox"
    with locked(f"busybox-{arch.name}"):
        if not binary.exists():
            _fetch_busybox(arch, home, binary)
    return binary


def _fetch_busybox(arch: Arch, home: Path, binary: Path) -> None:
    apt = PrivateApt(cache_dir("apt", f"{arch.debian}-trixie"), ["trixie"], arch.debian)
    progress(f"downloading busybox-static ({arch.debian})")
    deb = apt.download("busybox-static", home)
    extract(deb, home / "root")
    (home / "root/usr/bin/busybox").rename(binary)
    deb.unlink()


def guest_tools(arch: Arch) -> dict[str, bytes]:
    """Each tools/NAME.c as a static /bin/NAME (the busybox initramfs has no libc), built
    once per source and architecture."""
    home = cache_dir("tools", arch.name)
    tools = {}
    for source in tool_sources():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
        binary = home / f"{source.stem}-{digest}"
        if not binary.exists():
            _compile(arch, source, binary)
        tools[source.stem] = binary.read_bytes()
    return tools


def _compile(arch: Arch, source: Path, binary: Path) -> None:
    compiler = arch.compiler()
    partial = binary.with_name(f".{binary.name}.{os.getpid()}")  # renamed once complete
    cmd = [compiler, "-static", "-O2", "-Wall", "-Werror", "-o", str(partial), str(source)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        packages = " ".join(arch.cross_packages)
        raise SetupMissing(f"no C compiler for {arch.name} guest tools ({compiler}): install "
                           f"{'gcc and libc6-dev' if arch.native else packages} (apt-get "
                           "install, as root; in a checkout ./scripts/setup does), then run "
                           "`viommu setup` again") from None
    if result.returncode != 0:
        raise SetupMissing(f"building guest tool {source.name} failed:\n{result.stderr}")
    strip = "strip" if arch.native else f"{arch.cross_prefix}strip"
    subprocess.run([strip, str(partial)], check=False, capture_output=True)
    os.replace(partial, binary)


# --- the cpio archive ------------------------------------------------------------------------


class Cpio:
    """newc archive writer (the format the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", target: str = "") -> None:
        if target:
            data = target.encode()
        self._entry(name, mode, data, 0, 0)

    def add_device(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, mode, b"", major, minor)

    def _entry(self, name: str, mode: int, data: bytes, rdev_major: int, rdev_minor: int
               ) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev_major, rdev_minor,
                  len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.parts.append(_pad4(header + encoded) + _pad4(data))
        self.ino += 1

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)
