"""Build the test guest: a Debian kernel (VIRTIO_IOMMU, ACPI_VIOT) and a busybox initramfs.

Inputs are Debian packages resolved at build time (superseded kernels vanish from the
archive), so the kernel version is recorded in the manifest. The initramfs is reproducible:
sorted entries, zero timestamps and owners, gzip without a timestamp. A rebuild happens only
when the recipe (this directory) changes; the packages are cached.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "scripts"))
from debapt import PrivateApt, extract, progress  # noqa: E402

OUT = ROOT / ".cache" / "guest"
DEBS = ROOT / ".cache" / "guest-debs"
# Debian 13 with backports: a 7.x kernel (VIRTIO_IOMMU=m, ACPI_VIOT=y). From 6.13 on, the
# IOMMU core probes every device behind an IOMMU when it registers, so an endpoint without
# a guest driver still gets a default domain (6.12 only attaches devices at driver bind).
SUITES = ["trixie", "trixie-backports"]
DEFAULT_RELEASE = "trixie-backports"
KERNEL_META = "linux-image-amd64"
# 7.x splits the kernel image, its modules and its metadata into separate packages.
KERNEL_PARTS = ("linux-image-", "linux-binary-", "linux-modules-")
RECIPE = ("build.py", "init", "profile", "modules.txt")
TOOLS = HERE / "tools"  # each tools/NAME.c becomes a static /bin/NAME in the guest


def recipe_hash() -> str:
    h = hashlib.sha256()
    for path in [HERE / name for name in RECIPE] + sorted(TOOLS.glob("*.c")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def build_tools(out: Path) -> dict[str, bytes]:
    """Compile the guest tools: static, so the busybox initramfs needs no libc."""
    tools = {}
    for source in sorted(TOOLS.glob("*.c")):
        binary = out / source.stem
        cmd = ["cc", "-static", "-O2", "-Wall", "-Werror", "-o", str(binary), str(source)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"error: building guest tool {source.name} failed:\n{result.stderr}")
        subprocess.run(["strip", str(binary)], check=False)
        tools[source.stem] = binary.read_bytes()
    return tools


def up_to_date() -> bool:
    manifest = OUT / "manifest.json"
    if not manifest.exists():
        return False
    data = json.loads(manifest.read_text())
    return data.get("recipe") == recipe_hash() and all(
        (OUT / data[k]).exists() for k in ("kernel", "initramfs"))


def fetch_packages() -> list[Path]:
    """The kernel's packages and busybox-static, downloaded once into .cache/guest-debs."""
    listing = DEBS / "packages.txt"
    if listing.exists():
        debs = [DEBS / name for name in listing.read_text().split()]
        if all(d.exists() for d in debs):
            return debs
    apt = PrivateApt(ROOT / ".cache" / "apt-guest", SUITES, DEFAULT_RELEASE)
    apt.update()
    image = apt.depends_on(KERNEL_META, "linux-image-")
    if not image:
        sys.exit(f"error: {KERNEL_META} names no linux-image package")
    wanted = [image[0]] + [p for part in KERNEL_PARTS[1:] for p in
                           apt.depends_on(image[0], part)]
    progress(f"downloading {', '.join(wanted)} and busybox-static (~180 MB)")
    debs = [apt.download(p, DEBS) for p in wanted] + [apt.download("busybox-static", DEBS)]
    listing.write_text("\n".join(d.name for d in debs) + "\n")
    return debs


def module_index(moddir: Path) -> dict[str, Path]:
    """Module name (with - and _ equivalent) → .ko/.ko.xz path."""
    index = {}
    for path in moddir.rglob("*.ko*"):
        name = path.name.split(".ko")[0]
        index[name.replace("-", "_")] = path
    return index


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def depends(ko: bytes) -> list[str]:
    match = re.search(rb"(?:^|\0)depends=([^\0]*)", ko)
    return [d for d in match[1].decode().split(",") if d] if match else []


def load_order(wanted: list[str], index: dict[str, Path]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in order:
            return
        if key not in index:
            sys.exit(f"error: kernel module {name} not found")
        for dep in depends(module_bytes(index[key])):
            visit(dep)
        order.append(key)

    for name in wanted:
        visit(name)
    return order


class Cpio:
    """newc archive writer (the format the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", target: str = "") -> None:
        if target:
            data = target.encode()
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.parts.append(_pad4(header + encoded) + _pad4(data))
        self.ino += 1

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def build() -> None:
    debs = fetch_packages()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        for deb in debs:
            extract(deb, tree)
        release, vmlinuz = find_kernel(tree)
        index = module_index(tree / "usr/lib/modules" / release)
        lines = [ln.split() for ln in (HERE / "modules.txt").read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")]
        params = {words[0].replace("-", "_"): " ".join(words[1:]) for words in lines}
        order = load_order([words[0] for words in lines], index)
        progress(f"building the initramfs (kernel {release}, modules: {', '.join(order)})")
        cpio = Cpio()
        for d in ("bin", "dev", "etc", "lib", "lib/modules", f"lib/modules/{release}", "proc",
                  "sys", "tmp", "run", "root"):
            cpio.add(d, 0o040755)
        _add_console(cpio)
        cpio.add("bin/busybox", 0o100755, (tree / "usr/bin/busybox").read_bytes())
        cpio.add("bin/sh", 0o120777, target="busybox")
        cpio.add("init", 0o100755, (HERE / "init").read_bytes())
        cpio.add("etc/profile", 0o100644, (HERE / "profile").read_bytes())
        cpio.add("etc/modules", 0o100644,
                 "".join(f"{m} {params.get(m, '')}".rstrip() + "\n" for m in order).encode())
        for name, binary in build_tools(tree).items():
            cpio.add(f"bin/{name}", 0o100755, binary)
        for name in order:
            cpio.add(f"lib/modules/{release}/{name}.ko", 0o100644, module_bytes(index[name]))
        image = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)
        OUT.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vmlinuz, OUT / "vmlinuz")
        (OUT / "initramfs.cpio.gz").write_bytes(image)
    manifest = {"kernel": "vmlinuz", "initramfs": "initramfs.cpio.gz", "release": release,
                "packages": [d.name for d in debs],
                "modules": order, "recipe": recipe_hash(),
                "initramfs_sha256": hashlib.sha256(image).hexdigest()}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"guest image ready in .cache/guest ({len(image) // 1024} KiB initramfs)")


def find_kernel(tree: Path) -> tuple[str, Path]:
    """(release, image): /boot/vmlinuz-R (up to 6.x) or /usr/lib/modules/R/vmlinuz (7.x)."""
    for image in sorted((tree / "usr/lib/modules").glob("*/vmlinuz")):
        return image.parent.name, image
    for image in sorted((tree / "boot").glob("vmlinuz-*")):
        return image.name.removeprefix("vmlinuz-"), image
    sys.exit("error: no kernel image in the kernel packages")


def _add_console(cpio: Cpio) -> None:
    name = b"dev/console\0"
    fields = [cpio.ino, 0o020600, 0, 0, 1, 0, 0, 0, 0, 5, 1, len(name), 0]
    cpio.parts.append(_pad4(b"070701" + b"".join(b"%08X" % f for f in fields) + name))
    cpio.ino += 1


def main() -> None:
    if up_to_date():
        release = json.loads((OUT / "manifest.json").read_text())["release"]
        progress(f"guest image ready (kernel {release}, .cache/guest)")
        return
    build()


if __name__ == "__main__":
    main()
