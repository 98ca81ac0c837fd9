"""A real guest driver doing real DMA through the vIOMMU: the backend's virtio-blk endpoint
(viommu.endpoints.virtio_blk) hot-plugged into the shared guest, driven by Linux's
virtio_pci and virtio_blk with the IOMMU core's DMA API (dma-iommu MAPs and UNMAPs every
request's header, data, status and indirect table), every ring and buffer access translated
by the engine.

The disk appears behind the vIOMMU; 64 MiB go through it and back intact (checked in the
guest and in the image on the host), with lazy (DMA-FQ, Debian's default) and strict
(iommu.strict=1) flushing, counting the MAP and UNMAP requests each needs; a FAT file system
is made, filled and read back; the device's access to the guest's I/O buffer is revoked
at stage 2 (then made read-only) while the guest writes (reads): those requests fail with
the block layer's "I/O error" line and the virtio-iommu driver's fault line with the right
direction, nothing else on the disk changes, and once access is back the same process goes
on without a reboot. (Unplugging: test_virtio_blk_unplug.py.)
"""

from __future__ import annotations

import array
import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from viommu.testing.pytest_plugin import plugged_disk
from viommu.vm.disks import DISK_DEVICE, block_device
from viommu.vm.hotplug import HotpluggedEndpoint
from viommu.vm.machine import Machine
from viommu.vm.profile import EndpointSpec, load_profile

PORT = 1
MiB = 1 << 20
ROUND_TRIP = 64 * MiB
ROUND_TRIP_BS = 64 * 1024
LIVE_BLOCKS = 256  # 1 MiB of 4 KiB blocks
IO_ERROR = (r"I/O error, dev {disk}, sector \d+ op 0x{op}:\({name}\) flags 0x[0-9a-f]+ "
            r"phys_seg \d+ prio class \d+")
FAULT = r"virtio_iommu virtio\d+: page fault from EP {ep} at 0x[0-9a-f]+ \[{access}\]"


# --- the pattern blkverify writes (guest-images/tools/blkverify.c) ---------------------------

_INDEX: dict[int, int] = {}


def pattern(lba: int, seed: int, bs: int) -> bytes:
    """word[i] = (lba << 32) ^ (seed << 16) ^ i ^ 0x5a5a5a5a00000000, little-endian."""
    words = bs // 8
    if words not in _INDEX:
        _INDEX[words] = int.from_bytes(array.array("Q", range(words)).tobytes(), "little")
    base = (lba << 32) ^ (seed << 16) ^ 0x5A5A5A5A_0000_0000
    rep = int.from_bytes(base.to_bytes(8, "little") * words, "little")
    return (rep ^ _INDEX[words]).to_bytes(bs, "little")


def check_image(image: Path, blocks: int, bs: int, seed_of) -> list[int]:
    """Blocks of the host image that are not pattern(lba, seed_of(lba), bs)."""
    bad = []
    with open(image, "rb") as f:
        for lba in range(blocks):
            if f.read(bs) != pattern(lba, seed_of(lba), bs):
                bad.append(lba)
    return bad


def blkverify(vm: Machine, args: str, timeout: float = 300) -> dict:
    out = vm.run(f"blkverify {args}", timeout).output
    last = [ln for ln in out.splitlines() if ln.startswith("blkverify:")][-1]
    return dict(kv.split("=", 1) for kv in last.split()[1:] if "=" in kv)


def requests(vm: Machine) -> dict:
    return vm.backend("query-requests", limit=0)["counts"]


def disk_state(vm: Machine, endpoint: HotpluggedEndpoint) -> dict:
    [state] = [d for d in vm.backend("query-disks") if d["endpoint"] == endpoint.endpoint_id]
    return state


def backend_resources(vm: Machine) -> tuple[int, int]:
    """(open fds, VmRSS in KiB) of the backend process."""
    pid = vm.backend_pid
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])
    return fds, rss


@pytest.fixture(scope="module")
def disk(viommu_vm: Machine) -> Iterator[HotpluggedEndpoint]:
    with plugged_disk(viommu_vm, PORT, size=128 * MiB) as endpoint:
        yield endpoint


def round_trip(vm: Machine, disk: HotpluggedEndpoint, seed: int) -> dict:
    """64 MiB written and read back in 64 KiB O_DIRECT blocks; the image checked on the
    host; the MAP and UNMAP requests the guest sent, per MiB moved."""
    blocks = ROUND_TRIP // ROUND_TRIP_BS
    before, kicks = requests(vm), requestq_kicks(vm)
    result = blkverify(vm, f"/dev/{disk.disk} rw seq {blocks} {seed} {ROUND_TRIP_BS}")
    assert result["result"] == "PASS", result
    after = requests(vm)
    assert check_image(Path(disk.image), blocks, ROUND_TRIP_BS, lambda lba: seed) == []
    moved = 2 * ROUND_TRIP / MiB
    counts = {op: (after.get(op, 0) - before.get(op, 0)) / moved for op in ("MAP", "UNMAP")}
    # requestq kicks: the guest's syncs that found the request thread asleep
    return counts | {"kicks": (requestq_kicks(vm) - kicks) / moved,
                     "seconds": float(result["seconds"])}


def requestq_kicks(vm: Machine) -> int:
    return (vm.backend("query-status")["request_thread"] or {}).get("kicks", 0)


# --- the disk, behind the vIOMMU ------------------------------------------------------------


def test_virtio_blk_disk_is_in_an_iommu_group_on_a_translated_domain(
        guest: Machine, disk: HotpluggedEndpoint) -> None:
    name, sysfs = disk.disk, f"/sys/bus/pci/devices/{disk.sysfs_name}"
    assert guest.run(f"readlink -f /sys/block/{name}").check().output.count(disk.sysfs_name)
    group = guest.run(f"readlink {sysfs}/iommu_group").check().output.strip().rsplit("/")[-1]
    kind = guest.run(f"cat /sys/kernel/iommu_groups/{group}/type").check().output.strip()
    assert kind == ("DMA-FQ" if guest.guest_kernel.lazy_unmap else "DMA")
    [ep] = [e for e in guest.backend("query-endpoints") if e["endpoint"] == disk.endpoint_id]
    assert ep["mode"] == "translated" and ep["domain"] is not None
    # The ring's coherent allocation and the partition scan's reads were MAPped.
    trace = guest.backend("query-requests", limit=100000)["trace"]
    assert [e for e in trace if e["type"] == "MAP" and e.get("domain") == ep["domain"]]
    state = disk_state(guest, disk)
    assert state["virtio"]["status"] == "ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK"
    assert state["reads"] > 0 and state["ioerrors"] == 0 and state["error"] is None
    serial = guest.run(f"cat /sys/block/{name}/serial").check().output.strip()
    assert serial == f"viommu-blk-{disk.endpoint_id:04x}"
    assert guest.run(f"cat /sys/block/{name}/size").check().output.strip() == str(
        128 * MiB // 512)


def test_virtio_blk_64_mib_round_trip_with_lazy_flushing(
        guest: Machine, disk: HotpluggedEndpoint, record_property) -> None:
    per_mib = round_trip(guest, disk, seed=11)
    record_property("map_unmap_per_mib_lazy", per_mib)
    print(f"\nvirtio-blk 64 KiB O_DIRECT, {'lazy' if guest.guest_kernel.lazy_unmap else 'strict'}"
          f" flushing, per MiB: {per_mib}")
    assert per_mib["MAP"] > 16  # every request's buffers were mapped


@pytest.fixture(scope="module")
def strict_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """Strict flushing, and a disk cold-plugged from the profile with MSI-X (the shared
    guest's disks use what QEMU can unplug, viommu.vm.disks): the firmware reads it before
    the vIOMMU's driver starts, then Linux's drivers take it behind the vIOMMU."""
    profile = load_profile("default")
    disk = EndpointSpec("disk1", PORT, DISK_DEVICE, {"size": "128M", "msix": True})
    vm = Machine(dataclasses.replace(profile, endpoints=(*profile.endpoints, disk)),
                 workdir=tmp_path_factory.mktemp("blk-strict"), name="blk-strict",
                 kernel_args="iommu.strict=1")
    vm.launch()
    yield vm
    vm.shutdown()


@pytest.fixture(scope="module")
def strict_disk(strict_vm: Machine) -> HotpluggedEndpoint:
    [state] = strict_vm.backend("query-disks")
    sysfs = HotpluggedEndpoint("disk1", state["endpoint"], PORT).sysfs_name
    return HotpluggedEndpoint("disk1", state["endpoint"], PORT,
                              disk=block_device(strict_vm, sysfs), image=state["image"])


def test_virtio_blk_64_mib_round_trip_with_strict_flushing(
        strict_vm: Machine, strict_disk: HotpluggedEndpoint, record_property) -> None:
    assert not strict_vm.guest_kernel.lazy_unmap
    line = strict_vm.run("dmesg | grep 'TLB invalidation policy'").output
    assert "strict mode" in line, line
    disk = strict_disk
    assert disk.disk and Path(disk.image).parent == strict_vm.workdir
    irqs = strict_vm.run("cat /proc/interrupts").output
    assert re.search(r"PCI-MSIX-.*virtio\d+-req\.0", irqs), irqs
    group = strict_vm.run(f"readlink /sys/bus/pci/devices/{disk.sysfs_name}/iommu_group"
                          ).check().output.strip().rsplit("/")[-1]
    assert strict_vm.run(f"cat /sys/kernel/iommu_groups/{group}/type").output.strip() == "DMA"
    per_mib = round_trip(strict_vm, disk, seed=12)
    record_property("map_unmap_per_mib_strict", per_mib)
    print(f"\nvirtio-blk 64 KiB O_DIRECT, strict flushing, per MiB: {per_mib}")
    assert per_mib["UNMAP"] >= per_mib["MAP"] * 0.99  # each unmapped at completion


def test_virtio_blk_ring_that_does_not_translate_sets_needs_reset(
        strict_vm: Machine, strict_disk: HotpluggedEndpoint) -> None:
    """The avail ring's page revoked at stage 2: the next kick cannot read the avail index.
    The device sets DEVICE_NEEDS_RESET and raises its configuration vector (Linux then
    re-reads the capacity, and prints it), the fault reaches the guest, the backend goes
    on. Last on this VM: the request in flight never completes."""
    vm, disk = strict_vm, strict_disk
    [state] = [d for d in vm.backend("query-disks") if d["endpoint"] == disk.endpoint_id]
    avail = state["virtio"]["queues"][0]["driver"]
    [ep] = [e for e in vm.backend("query-endpoints") if e["endpoint"] == disk.endpoint_id]
    [domain] = [d for d in vm.backend("query-domains") if d["domain"] == ep["domain"]]
    [ring] = [m for m in domain["mappings"] if m["virt_start"] <= avail <= m["virt_end"]]
    gpa = ring["phys_start"] + avail - ring["virt_start"]
    mark = vm.mark()
    vm.backend("stage2-set", ipa=gpa & ~0xFFF, size=4096, access="none")
    vm.run(f"dd if=/dev/{disk.disk} of=/dev/null bs=4096 count=1 skip=7 iflag=direct "
           "2>/dev/null &")
    vm.wait_line(FAULT.format(ep=disk.endpoint_id, access="[RW]"), since=mark)
    # KERN_NOTICE: below the console's loglevel, in dmesg
    wait_output(vm, "dmesg", rf"virtio_blk virtio\d+: \[{disk.disk}\] new size: \d+ 512-byte")
    [state] = [d for d in vm.backend("query-disks") if d["endpoint"] == disk.endpoint_id]
    assert "ring access did not translate" in state["error"]
    assert "NEEDS_RESET" in state["virtio"]["status"]
    assert vm.backend("query-status")["connected"]  # the backend goes on


# --- a file system ------------------------------------------------------------------------------


@pytest.mark.viommu_disk(size=64 * MiB)
def test_virtio_blk_fat_file_system_survives_a_remount(guest: Machine,
                                                       blk_disk: HotpluggedEndpoint) -> None:
    dev = f"/dev/{blk_disk.disk}"
    guest.run(f"mkdosfs -n VBLK {dev}", 60).check()
    guest.run(f"mkdir -p /mnt/vblk && mount -t vfat {dev} /mnt/vblk").check()
    guest.run("dd if=/dev/urandom of=/mnt/vblk/random.bin bs=64k count=64 2>/dev/null && "
              "for i in 1 2 3 4 5 6 7 8; do echo file $i > /mnt/vblk/small$i.txt; done && "
              # fsync: vfat's fat_file_fsync ends with a cache flush (VIRTIO_BLK_T_FLUSH)
              "sync && sync -d /mnt/vblk/random.bin", 120).check()
    before = guest.run("(cd /mnt/vblk && sha256sum random.bin small*.txt)").check().output
    guest.run("umount /mnt/vblk && echo 3 > /proc/sys/vm/drop_caches").check()
    flushes = disk_state(guest, blk_disk)["flushes"]
    guest.run(f"mount -t vfat -o ro {dev} /mnt/vblk").check()
    try:
        after = guest.run("(cd /mnt/vblk && sha256sum random.bin small*.txt)").check().output
    finally:
        guest.run("umount /mnt/vblk")
    assert after == before and len(before.splitlines()) == 9
    state = disk_state(guest, blk_disk)
    assert flushes > 0 and state["ioerrors"] == 0 and state["reads"] > 0


# --- faults in the middle of live I/O ------------------------------------------------------------


def wait_log(vm: Machine, path: str, pattern: str, timeout: float = 60) -> re.Match:
    return wait_output(vm, f"cat {path}", pattern, timeout)


def wait_output(vm: Machine, command: str, pattern: str, timeout: float = 60) -> re.Match:
    """The last match of `pattern` in what `command` prints, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(re.finditer(pattern, vm.run(command).output, re.M))
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no {pattern!r} from {command!r} in {timeout} s"
        time.sleep(0.3)


def live(vm: Machine, disk: HotpluggedEndpoint, mode: str, seed: int, access: str,
         tag: str) -> dict:
    """Run blkverify `mode` in the background; once it works, set the stage-2 `access` of
    its I/O buffer's page, wait for failures, restore, wait for a clean pass, stop it.
    Returns the guest's lines during the fault and the tool's last line."""
    log, stop = f"/tmp/{tag}.log", f"/tmp/{tag}.stop"
    vm.run(f"rm -f {stop}; blkverify /dev/{disk.disk} {mode} {LIVE_BLOCKS} {seed} {stop} "
           f"> {log} 2>&1 &").check()
    gpa = int(wait_log(vm, log, r"buffer gpa=(0x[0-9a-f]+)")[1], 16)
    assert gpa, "the guest tool could not read its buffer's address (/proc/self/pagemap)"
    wait_log(vm, log, r"pass=\d+ .* failed=0")
    mark = vm.mark()
    vm.backend("stage2-set", ipa=gpa, size=4096, access=access)
    try:
        failing = wait_log(vm, log, r"pass=(\d+) .* failed=([1-9]\d*)")
    finally:
        vm.backend("stage2-reset")
    wait_clean_pass_after(vm, log, int(failing[1]))
    vm.run(f"touch {stop}").check()
    final = wait_log(vm, log, r"^blkverify: mode=.* result=(\w+)$")
    return {"mark": mark, "gpa": gpa, "final": final[0], "log": vm.run(f"cat {log}").output}


def wait_clean_pass_after(vm: Machine, log: str, failed_pass: int, timeout: float = 60) -> None:
    """Until a pass after `failed_pass` had no error: access is back, the process goes on."""
    deadline = time.monotonic() + timeout
    while not [p for p, failed in re.findall(r"pass=(\d+) .* failed=(\d+)",
                                              vm.run(f"cat {log}").output)
               if int(p) > failed_pass and failed == "0"]:
        assert time.monotonic() < deadline, f"no clean pass after pass {failed_pass}"
        time.sleep(0.3)


def test_virtio_blk_faults_on_live_io_fail_those_requests_and_recover(
        guest: Machine, disk: HotpluggedEndpoint, record_property) -> None:
    """Revoked (stage 2 'none') under writes, then read-only under reads: the guest's block
    layer and virtio-iommu driver report each, the image changes only where writes
    succeeded, and the same processes go on once access is back."""
    name, ep = disk.disk, disk.endpoint_id
    baseline = 500
    assert blkverify(guest, f"/dev/{name} write seq {LIVE_BLOCKS} {baseline}")["result"] == "PASS"
    guest.wait_fault_window()
    before = disk_state(guest, disk)
    w = live(guest, disk, "live-write", baseline + 1, "none", "live-write")
    io_error = guest.wait_line(IO_ERROR.format(disk=name, op=1, name="WRITE"), since=w["mark"])
    fault = guest.wait_line(FAULT.format(ep=ep, access="R"), since=w["mark"])
    assert "result=PASS" in w["final"], w["log"]
    # The image: every block holds the seed of its last write that succeeded.
    stale = dict(tuple(map(int, item.split(":"))) for item in re.search(
        r"stale=(\S+)", w["log"])[1].split(",") if item != "none")
    last = max(int(p) for p in re.findall(r"pass=(\d+)", w["log"])) + baseline + 1
    assert check_image(Path(disk.image), LIVE_BLOCKS, 4096,
                       lambda lba: stale.get(lba, last)) == []
    after = disk_state(guest, disk)
    assert after["ioerrors"] > before["ioerrors"] and after["faults_relayed"] > 0
    assert after["error"] is None and "NEEDS_RESET" not in after["virtio"]["status"]

    assert blkverify(guest, f"/dev/{name} write seq {LIVE_BLOCKS} {last}")["result"] == "PASS"
    guest.wait_fault_window()  # a fresh window of the fault lines' rate limit
    r = live(guest, disk, "live-read", last, "ro", "live-read")
    read_error = guest.wait_line(IO_ERROR.format(disk=name, op=0, name="READ"), since=r["mark"])
    read_fault = guest.wait_line(FAULT.format(ep=ep, access="W"), since=r["mark"])
    assert "result=PASS" in r["final"], r["log"]
    assert blkverify(guest, f"/dev/{name} rw rand 64 {last + 1}")["result"] == "PASS"
    output = "\n".join([io_error, fault, read_error, read_fault])
    record_property("guest_lines", output)
    print("\nguest output, fault on live I/O:\n" + output)
    print(f"write side: {w['final']}\nread side: {r['final']}")
