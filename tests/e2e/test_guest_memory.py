"""The table area: guest-physical memory the guest kernel never uses, which the backend can
read and write through its control API (tests put page tables there)."""

from __future__ import annotations

import re

from viommu.vm.machine import Machine


def test_table_area_is_reserved_in_the_guest(guest: Machine) -> None:
    base, size = guest.table_area
    iomem = guest.run("cat /proc/iomem").check().output
    # x86 marks a memmap= range Reserved; arm64 leaves a no-map reserved-memory range out of
    # System RAM, listed as reserved
    assert re.search(rf"^\s*{base:08x}-{base + size - 1:08x} : [Rr]eserved$", iomem, re.M), iomem


def test_backend_writes_guest_memory_that_the_guest_reads_back(guest: Machine) -> None:
    gpa = guest.table_area[0] + 0x1000
    guest.backend("memory-write", gpa=gpa, data="efbeadde78563412")
    assert guest.backend("memory-read", gpa=gpa, size=8)["data"] == "efbeadde78563412"
    seen = guest.run(f"devmem {gpa:#x} 64").check().output.split()[-1]
    assert int(seen, 16) == 0x12345678DEADBEEF
    guest.backend("memory-write", gpa=gpa, data="00" * 8)
