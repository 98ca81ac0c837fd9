"""Driving the DMA endpoint from the guest in e2e tests: the guest tool's `dma` runs, and
SMMUv3 tables built in a mirror of the guest's reserved table area."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

from pagetables import GuestRam, Stage1Tables, cd, ste
from viommu.vm.hotplug import HotpluggedEndpoint
from viommu.vm.machine import Machine

_steps = itertools.count(1)


def run_dma(guest: Machine, ep: HotpluggedEndpoint, src: int, dst: int, length: int, *options: str,
            before: list[Callable[[], None]] | None = None) -> list[dict]:
    """Run the guest tool's DMA; `before[i]` runs before doorbell i+1 (the tool waits)."""
    mark = guest.mark()
    cmd = f"viommu-vfio dma {ep.sysfs_name} {src:#x} {dst:#x} {length} {' '.join(options)}"
    if not before:
        guest.run(cmd)
    else:
        prefix = f"/tmp/doorbell-{next(_steps)}"
        guest.console.send_line(f"{cmd} --steps {len(before)} --wait {prefix} &")
        for step, action in enumerate(before, 1):
            guest.wait_line(rf"viommu-vfio: dma ready step={step}$", since=mark)
            action()
            guest.run(f"touch {prefix}.{step}")
        guest.run("wait")
    lines = re.findall(r"^viommu-vfio: dma step=.*$", guest.console.transcript[mark:], re.M)
    return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in lines]


def start_dma(guest: Machine, ep: HotpluggedEndpoint, src: int, dst: int, length: int,
              *options: str) -> tuple[int, str]:
    """Start the tool in the background, stopped before its doorbell; returns (console mark,
    file to create to ring it)."""
    mark = guest.mark()
    prefix = f"/tmp/doorbell-{next(_steps)}"
    guest.console.send_line(f"viommu-vfio dma {ep.sysfs_name} {src:#x} {dst:#x} {length} "
                            f"{' '.join(options)} --wait {prefix} &")
    guest.wait_line(r"viommu-vfio: dma ready step=1$", since=mark)
    return mark, f"{prefix}.1"


def finish_dma(guest: Machine, mark: int) -> dict:
    guest.run("wait")
    [line] = re.findall(r"^viommu-vfio: dma step=.*$", guest.console.transcript[mark:], re.M)
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


SRC_IOVA, DST_IOVA = 0x10000, 0x7F00_0000


class TableArea:
    """STE/CD/stage-1 tables and data pages built in a mirror of the guest's reserved table
    area, then written to the guest with memory-write."""

    def __init__(self, guest: Machine, granule: int = 4096) -> None:
        self.guest = guest
        base, size = guest.table_area
        self.ram = GuestRam(size, base)
        self.tables = Stage1Tables(self.ram, granule)
        self.cd_gpa = self.ram.alloc(64, 64)
        self.write_cd(valid=True)
        self.src = self.ram.alloc(4096)
        self.dst = self.ram.alloc(4096)
        self.ram.write(self.src, bytes((i * 13 + 1) & 0xFF for i in range(4096)))
        self.tables.map(SRC_IOVA, self.src, ap_ro=True)
        self.tables.map(DST_IOVA, self.dst)

    def write_cd(self, valid: bool) -> None:
        self.ram.write(self.cd_gpa, cd(ttb0=self.tables.root, t0sz=16, valid=valid, asid=7))

    def upload(self) -> None:
        used = self.ram._next - self.ram.base
        for off in range(0, used, 1 << 19):
            chunk = self.ram.read(self.ram.base + off, min(1 << 19, used - off))
            self.guest.backend("memory-write", gpa=self.ram.base + off, data=chunk.hex())

    def ste(self, **kwargs) -> tuple[int, int]:
        return ste(self.cd_gpa, **kwargs)

    def destination(self) -> bytes:
        return bytes.fromhex(self.guest.backend("memory-read", gpa=self.dst, size=4096)["data"])


