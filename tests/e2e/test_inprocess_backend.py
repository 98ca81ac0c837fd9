"""The controller can run the backend inside its own process (a thread) instead of a child
process; the guest cannot tell the difference."""

from __future__ import annotations

import threading

from viommu.vm.machine import Machine


def test_guest_boots_and_reacts_with_an_in_process_backend(tmp_path) -> None:
    with Machine(workdir=tmp_path, name="inproc", backend_in_process=True) as vm:
        assert any(t.name == "viommu-backend" for t in threading.enumerate())
        counts = vm.backend("query-requests")["counts"]
        # The requests reach the in-process backend: PROBE and ATTACH where the kernel
        # attaches endpoints when the IOMMU registers (viommu.vm.guest_kernel).
        if vm.guest_kernel.attaches_at_registration:
            assert counts.get("PROBE", 0) >= 1 and counts.get("ATTACH", 0) >= 1
        else:
            vm.run("viommu-vfio bind 0000:01:00.0").check()
            counts = vm.backend("query-requests")["counts"]
            assert counts.get("ATTACH", 0) >= 1
        mark = vm.mark()
        vm.inject("F_TRANSLATION", address=0x5000, access="write")
        vm.wait_line(r"virtio_iommu virtio\d+: page fault from EP 256 at 0x5000 \[W\]$",
                     since=mark)
    assert (tmp_path / "backend.log").read_text().count("queue 0 started") >= 1
