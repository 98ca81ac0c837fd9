"""The table area: guest-physical memory the guest kernel never uses, which the backend can
read and write through its control API (tests put page tables there)."""

from __future__ import annotations

from viommu.vm.machine import Machine


def test_table_area_is_reserved_in_the_guest(guest: Machine) -> None:
    base = guest.profile.table_area_base
    end = base + guest.profile.table_area_size - 1
    iomem = guest.run("cat /proc/iomem").check().output
    assert f"{base:08x}-{end:08x} : Reserved" in iomem


def test_backend_writes_guest_memory_that_the_guest_reads_back(guest: Machine) -> None:
    gpa = guest.profile.table_area_base + 0x1000
    guest.backend("memory-write", gpa=gpa, data="efbeadde78563412")
    assert guest.backend("memory-read", gpa=gpa, size=8)["data"] == "efbeadde78563412"
    seen = guest.run(f"devmem {gpa:#x} 64").check().output.split()[-1]
    assert int(seen, 16) == 0x12345678DEADBEEF
    guest.backend("memory-write", gpa=gpa, data="00" * 8)
