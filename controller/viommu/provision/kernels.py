"""Guest kernels: a Debian kernel series, or the kernel a developer just built.

A kernel SPEC is one of:
- a Debian series set-up can fetch: `7` (the newest in trixie-backports, the default),
  `6.12` (trixie's LTS kernel), `6.1` (bookworm's; it lacks VIRTIO_IOMMU and is refused);
- a kernel build tree, like `vng` run inside one: its image (arch/x86/boot/bzImage,
  arch/arm64/boot/Image), its .config, and the modules `modules.order` lists, as built;
- a kernel image, with `modules` a lib/modules/<release> tree (or nothing: all built in).

Debian kernels are fetched on first use into the cache, and the exact package version is
recorded: superseded versions vanish from the archive, so the version in use is reported
wherever results are (`viommu ls`, test reports, benchmark JSON).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from viommu.provision.arch import Arch
from viommu.provision.cache import SetupMissing, cache_dir, locked, progress
from viommu.provision.debian import PrivateApt, deb_version, extract

DEFAULT_KERNEL = "7"


@dataclasses.dataclass(frozen=True)
class DebianSeries:
    series: str
    suites: tuple[str, ...]
    release: str  # the suite the metapackage is resolved in
    note: str


DEBIAN_SERIES = {
    "7": DebianSeries("7", ("trixie", "trixie-backports"), "trixie-backports",
                      "the newest 7.x in Debian trixie-backports"),
    "6.12": DebianSeries("6.12", ("trixie",), "trixie", "Debian trixie's LTS kernel"),
    "6.1": DebianSeries("6.1", ("bookworm",), "bookworm",
                        "Debian bookworm's kernel (no VIRTIO_IOMMU: refused before boot)"),
}
# 7.x splits the kernel into packages: its image, its modules, and its metadata (the
# configuration among them); 6.x has them all in linux-image-*.
KERNEL_PARTS = ("linux-image-", "linux-base-", "linux-binary-", "linux-modules-")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A bootable guest kernel, and where its modules and configuration are."""

    spec: str  # as the user gave it
    arch: str
    image: Path
    release: str  # what `uname -r` prints
    origin: str  # where it came from, with the exact version: for reports
    config: Path | None = None  # .config or config-<release>; None: IKCONFIG, or unknown
    modules_dir: Path | None = None  # a lib/modules/<release> tree
    build_tree: Path | None = None  # modules as built, listed by modules.order

    @property
    def key(self) -> str:
        """Names this kernel's images in the cache: the release, and which file it is."""
        stat = self.image.stat()
        identity = f"{self.image.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
        digest = hashlib.sha256(identity).hexdigest()[:10]
        return f"{re.sub(r'[^A-Za-z0-9.+_-]', '_', self.release)}-{digest}"

    def module_files(self) -> dict[str, Path]:
        """Module name (with - and _ alike) → its .ko (or .ko.xz, .ko.zst) file."""
        files: dict[str, Path] = {}
        if self.build_tree is not None:
            order = self.build_tree / "modules.order"
            for line in order.read_text().split() if order.exists() else []:
                ko = self.build_tree / re.sub(r"\.o$", ".ko", line)
                if ko.exists():  # listed, but not built (make modules not run)
                    files[_module_name(ko.name)] = ko
        elif self.modules_dir is not None:
            for ko in self.modules_dir.rglob("*.ko*"):
                files[_module_name(ko.name)] = ko
        return files

    def builtin_modules(self) -> set[str]:
        """Modules compiled into the image (modules.builtin)."""
        root = self.build_tree or self.modules_dir
        listing = root / "modules.builtin" if root is not None else None
        if listing is None or not listing.exists():
            return set()
        return {_module_name(Path(line).name) for line in listing.read_text().split()}

    def to_dict(self) -> dict:
        return {"spec": self.spec, "arch": self.arch, "release": self.release,
                "origin": self.origin, "image": str(self.image)}


def _module_name(filename: str) -> str:
    return filename.split(".ko")[0].replace("-", "_")


# --- resolving a SPEC --------------------------------------------------------------------


class KernelNotFound(ValueError):
    """A kernel SPEC names nothing usable; the message says what was wrong with it."""


def resolve_kernel(spec: str | None, arch: Arch, modules: str | Path | None = None,
                   fetch: bool = True) -> Kernel:
    """The kernel SPEC names (default: the newest Debian 7.x); a Debian series not yet in
    the cache is fetched when `fetch`, else SetupMissing says how to get it."""
    spec = spec or DEFAULT_KERNEL
    if spec in DEBIAN_SERIES:
        return debian_kernel(DEBIAN_SERIES[spec], arch, fetch)
    path = Path(spec).expanduser()
    if path.is_dir():
        if modules is not None:
            raise KernelNotFound("--modules goes with a kernel image, not a build tree (its "
                             "modules are taken from the tree)")
        return build_tree_kernel(path, arch, spec)
    if path.is_file():
        return image_kernel(path, arch, spec, Path(modules).expanduser() if modules else None)
    known = ", ".join(DEBIAN_SERIES)
    raise KernelNotFound(f"kernel {spec!r}: not a Debian series ({known}) nor an existing kernel "
                     "build tree or image file")


def build_tree_kernel(tree: Path, arch: Arch, spec: str) -> Kernel:
    image = tree / arch.tree_image
    if not image.is_file():
        cross = "" if arch.native else f" ARCH=arm64 CROSS_COMPILE={arch.cross_prefix}"
        raise KernelNotFound(f"{tree} has no {arch.tree_image}: build the kernel first (make "
                         f"-j$(nproc){cross}), or give --arch if it was built for another "
                         "architecture")
    release_file = tree / "include/config/kernel.release"
    release = release_file.read_text().strip() if release_file.exists() else read_release(image)
    config = tree / ".config"
    return Kernel(spec, arch.name, image, release or "unknown", f"build tree {tree}",
                  config if config.exists() else None, None, tree)


def image_kernel(image: Path, arch: Arch, spec: str, modules: Path | None) -> Kernel:
    if modules is not None and not modules.is_dir():
        raise KernelNotFound(f"--modules {modules}: not a directory (give a lib/modules/<release> "
                         "tree, as `make modules_install INSTALL_MOD_PATH=DIR` makes one)")
    release = modules.name if modules is not None else (read_release(image) or "unknown")
    config = next((c for c in (image.parent / f"config-{release}",
                               modules / "build/.config" if modules else None)
                   if c is not None and c.exists()), None)
    return Kernel(spec, arch.name, image, release, f"image {image}", config, modules)


def read_release(image: Path) -> str | None:
    """The release in an x86 bzImage's setup header (kernel_version), or a plain
    "Linux version R" string in an uncompressed image."""
    data = image.read_bytes()
    if data[0x202:0x206] == b"HdrS":
        offset = int.from_bytes(data[0x20E:0x210], "little") + 0x200
        end = data.find(b"\0", offset)
        return data[offset:end].decode(errors="replace").split()[0] if end > offset else None
    match = re.search(rb"Linux version (\S+)", data)
    return match[1].decode(errors="replace") if match else None


# --- Debian kernels ----------------------------------------------------------------------


def debian_kernel(series: DebianSeries, arch: Arch, fetch: bool = True) -> Kernel:
    home = cache_dir("kernels", arch.name, f"debian-{series.series}")
    manifest = home / "manifest.json"
    if not manifest.exists():
        if not fetch:
            raise SetupMissing(f"Debian kernel {series.series} ({arch.name}) is not in the "
                               f"cache: run `viommu setup --kernel {series.series} --arch "
                               f"{arch.name}`")
        with locked(f"kernel-{arch.name}-{series.series}"):
            if not manifest.exists():  # another process may have fetched it meanwhile
                fetch_debian_kernel(series, arch, home)
    data = json.loads(manifest.read_text())
    return Kernel(series.series, arch.name, home / data["image"], data["release"],
                  data["origin"], home / data["config"] if data.get("config") else None,
                  home / data["modules_dir"])


def fetch_debian_kernel(series: DebianSeries, arch: Arch, home: Path) -> None:
    apt = PrivateApt(cache_dir("apt", f"{arch.debian}-{'+'.join(series.suites)}"),
                     list(series.suites), arch.debian, series.release)
    image = apt.depends_on(arch.kernel_meta, "linux-image-")
    if not image:
        raise SetupMissing(f"{arch.kernel_meta} names no linux-image package in "
                           f"{series.release}")
    wanted = [image[0]] + [p for part in KERNEL_PARTS[1:] for p in apt.depends_on(image[0], part)]
    progress(f"downloading {', '.join(wanted)} ({series.note}; ~100 MB)")
    debs = [apt.download(p, cache_dir("debs", arch.debian)) for p in wanted]
    if home.exists():
        shutil.rmtree(home)
    with tempfile.TemporaryDirectory(dir=home.parent) as tmp:
        tree = Path(tmp)
        progress(f"unpacking {len(debs)} kernel packages")
        for deb in debs:
            extract(deb, tree)
        release, vmlinuz = _find_debian_image(tree)
        modules = tree / "usr/lib/modules" / release
        if not modules.exists():
            modules = tree / "lib/modules" / release
        places = (f"boot/config-{release}", f"usr/lib/modules/{release}/config")
        config = next((c for pattern in places for c in tree.glob(pattern)), None)
        home.mkdir()
        if config is not None:  # first: 7.x keeps it in the modules directory
            shutil.move(config, home / "config")
        shutil.move(vmlinuz, home / "vmlinuz")
        shutil.move(modules, home / "modules")
    versions = [deb_version(d) for d in debs]
    origin = f"Debian {versions[0][0]} {versions[0][1]}"  # the parts share one version
    for deb in debs:  # unpacked: the kernel's directory is what is kept
        deb.unlink()
    (home / "manifest.json").write_text(json.dumps({
        "series": series.series, "arch": arch.name, "release": release, "origin": origin,
        "packages": [{"name": n, "version": v} for n, v in versions],
        "image": "vmlinuz", "modules_dir": "modules",
        "config": "config" if config is not None else None, "fetched": time.time(),
    }, indent=1) + "\n")
    progress(f"kernel {release} ready ({origin})")


def _find_debian_image(tree: Path) -> tuple[str, Path]:
    """(release, image): /boot/vmlinuz-R (up to 6.x) or /usr/lib/modules/R/vmlinuz (7.x)."""
    for image in sorted((tree / "usr/lib/modules").glob("*/vmlinuz")):
        return image.parent.name, image
    for image in sorted((tree / "boot").glob("vmlinuz-*")):
        return image.name.removeprefix("vmlinuz-"), image
    raise SetupMissing("no kernel image in the kernel packages")
