"""Block I/O in the guest through a vIOMMU, beside its anchor in the same run: random 4 KiB
O_DIRECT read IOPS and sequential 64 KiB O_DIRECT write MB/s (blkverify randread and
seqwrite), on
  (a) viommu's virtio-blk endpoint behind viommu's virtio-iommu (out of process),
  (b) QEMU's virtio-blk-pci,iommu_platform=on behind QEMU's virtio-iommu-pci,
  (c) QEMU's virtio-blk-pci without an IOMMU,
each backed by a raw image file in the same directory (same host file system, page cache
the same way: QEMU's default cache=writeback, our preadv/pwritev). Each round boots one VM
of each kind, in a rotating order, so a slow patch of the machine hits all of them; figures
are medians over rounds. Ratios are ours / QEMU's in-process pair (b).

    .venv/bin/python benchmarks/blk.py [--json] [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import tempfile
from pathlib import Path

from maplat import spread

from viommu.vm.disks import DiskSpec
from viommu.vm.machine import Machine
from viommu.vm.profile import load_profile

IMAGE = 96 << 20
SEQ_BS = 64 << 10
SEQ_BLOCKS = (64 << 20) // SEQ_BS  # 64 MiB written
RAND_BLOCKS = (64 << 20) // 4096  # random reads over what was written
PORT = 1
KINDS = ("viommu", "qemu_virtio_iommu", "no_iommu")


def _machine(kind: str, workdir: Path) -> Machine:
    """The VM; for QEMU's disks with its image on the command line (ours is plugged after
    boot)."""
    profile = load_profile("default")
    if kind == "viommu":
        return Machine(profile, workdir=workdir, name=f"blk-{kind}")
    image = workdir / "qemu-disk.img"
    workdir.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(IMAGE)
    platform = ",iommu_platform=on" if kind == "qemu_virtio_iommu" else ""
    profile = dataclasses.replace(profile, extra_args=(
        "-drive", f"file={image},if=none,id=bench0,format=raw",
        "-device", f"virtio-blk-pci,drive=bench0,bus=rp{PORT}{platform}"))
    iommu = "qemu" if kind == "qemu_virtio_iommu" else "none"
    return Machine(profile, workdir=workdir, name=f"blk-{kind}", iommu=iommu)


def _figure(out: str, key: str) -> float:
    line = [ln for ln in out.splitlines() if ln.startswith("blkverify: mode=")][-1]
    assert "result=PASS" in line, line
    return float(re.search(rf"\b{key}=([\d.]+)", line)[1])


def measure_kind(kind: str, workdir: Path, seconds: float) -> dict:
    vm = _machine(kind, workdir)
    with vm:
        if kind == "viommu":
            disk = vm.add_disk(PORT, DiskSpec(size=IMAGE, msix=True)).disk  # never unplugged
        else:
            disk = vm.run("ls /sys/block | grep vd").check().output.split()[0]
        dev = f"/dev/{disk}"
        before = vm.backend("query-requests", limit=0)["counts"] if kind == "viommu" else {}
        write = vm.run(f"blkverify {dev} seqwrite {SEQ_BLOCKS} {SEQ_BS}", 900).check().output
        read = vm.run(f"blkverify {dev} randread {RAND_BLOCKS} {seconds:g}", 900).check().output
        out = {"mbps": _figure(write, "mbps"), "iops": _figure(read, "iops")}
        if kind == "viommu":
            after = vm.backend("query-requests", limit=0)["counts"]
            ios = SEQ_BLOCKS + int(_figure(read, "ios"))
            out["maps_per_io"] = (after.get("MAP", 0) - before.get("MAP", 0)) / ios
            out["request_thread"] = vm.backend("query-status")["request_thread"]
        return out


def measure(rounds: int, seconds: float) -> dict:
    per_round = []
    with tempfile.TemporaryDirectory(prefix="viommu-blk-bench-") as tmp:
        for i in range(rounds):
            order = KINDS[i % 3:] + KINDS[:i % 3]
            per_round.append({kind: measure_kind(kind, Path(tmp) / f"{kind}-{i}", seconds)
                              for kind in order})
    results: dict = {"blk_rounds": per_round}
    for metric in ("iops", "mbps"):
        by_kind = {kind: spread([r[kind][metric] for r in per_round]) for kind in KINDS}
        results[f"blk_{metric}"] = {kind: s["median"] for kind, s in by_kind.items()}
        results[f"blk_{metric}_spread"] = by_kind
        ratios = [r["viommu"][metric] / r["qemu_virtio_iommu"][metric] for r in per_round]
        results[f"blk_{metric}_ratio_vs_qemu"] = (results[f"blk_{metric}"]["viommu"]
                                                  / results[f"blk_{metric}"]["qemu_virtio_iommu"])
        results[f"blk_{metric}_ratio_spread"] = spread(ratios)
    results["blk_maps_per_io"] = statistics.median(r["viommu"]["maps_per_io"] for r in per_round)
    return results


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """The figures' rows for benchmarks/run.py's table."""
    rows = []
    for metric, label in (("iops", "guest random 4 KiB read, IOPS"),
                          ("mbps", "guest sequential 64 KiB write, MB/s")):
        value, ratio = results[f"blk_{metric}"], results[f"blk_{metric}_ratio_spread"]
        rows.append((label, f"{value['viommu']:.0f} (viommu virtio-blk)",
                     f"QEMU virtio-blk + virtio-iommu-pci {value['qemu_virtio_iommu']:.0f}; "
                     f"no IOMMU {value['no_iommu']:.0f}",
                     f"{results[f'blk_{metric}_ratio_vs_qemu']:.2f} "
                     f"[{ratio['min']:.2f}-{ratio['max']:.2f}]  (target >= 0.8)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rounds", type=int, default=3, help="VMs of each kind booted")
    parser.add_argument("--seconds", type=float, default=5, help="of random reads a VM")
    args = parser.parse_args()
    results = measure(args.rounds, args.seconds)
    if args.json:
        print(json.dumps(results))
        return
    for row in table_rows(results):
        print("  ".join(row))
    print(f"MAP requests per I/O (ours): {results['blk_maps_per_io']:.2f}")


if __name__ == "__main__":
    main()
