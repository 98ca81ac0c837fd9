"""Disks unplugged from the shared guest, idle and in the middle of I/O: the guest drops
the disk and lives on, the backend drops the endpoint, and no fd or memory stays behind.

A module of its own so that no disk of test_virtio_blk.py's is plugged meanwhile: where a
root port takes one hot-plug per boot (aarch64's virt), the plugin then reboots the guest
between plugs (viommu.testing.pytest_plugin.ready_port)."""

from __future__ import annotations

from viommu.testing.pytest_plugin import plugged_disk
from viommu.vm.machine import Machine

from .test_virtio_blk import MiB, backend_resources, blkverify, wait_log


def test_virtio_blk_hot_unplug_idle_and_during_io_leaves_no_fd_or_memory(
        guest: Machine) -> None:
    port = 2
    with plugged_disk(guest, port, size=16 * MiB):  # warm-up: first-use allocations
        pass
    fds, rss = backend_resources(guest)
    for cycle in range(3):
        with plugged_disk(guest, port, size=16 * MiB) as d:
            assert blkverify(guest, f"/dev/{d.disk} rw seq 64 {cycle}")["result"] == "PASS"
            if cycle == 2:  # unplugged while a writer runs
                guest.run(f"rm -f /tmp/unplug.stop; blkverify /dev/{d.disk} live-write 1024 "
                          f"7 /tmp/unplug.stop > /tmp/unplug.log 2>&1 &").check()
                wait_log(guest, "/tmp/unplug.log", r"pass=\d+")
        assert guest.run(f"test -e /sys/block/{d.disk}").status != 0
        assert d.endpoint_id not in [x["endpoint"] for x in guest.backend("query-disks")]
    guest.run("touch /tmp/unplug.stop")  # the writer, its disk gone, ends its pass and exits
    assert "alive" in guest.run("echo alive").check().program_lines()  # the guest lives on
    after_fds, after_rss = backend_resources(guest)
    assert after_fds == fds, f"backend fds {fds} -> {after_fds}"
    assert after_rss - rss < 8 * 1024, f"backend RSS {rss} -> {after_rss} KiB"
