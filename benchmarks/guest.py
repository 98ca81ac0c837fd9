"""Guest-side benchmarks, each beside its anchor in the same run: VFIO map/unmap latency
through our device and through QEMU's in-process virtio-iommu-pci (same guest kernel), boot
time with and without our vIOMMU, endpoint DMA throughput, and the fault round trip.

    .venv/bin/python benchmarks/guest.py [--json] [--maps 2000]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from viommu.machine import Machine

BDF = "0000:01:00.0"
DMA_LEN = 64 * 1024
DMA_REPEAT = 200


def _vm(workdir: Path, name: str, iommu: str) -> Machine:
    return Machine("default", workdir=workdir / name, name=name, iommu=iommu)


def map_latency(vm: Machine, count: int) -> tuple[float, float]:
    """Median guest VFIO map and unmap of 4 KiB, in µs (viommu-vfio maplat)."""
    vm.run(f"viommu-vfio bind {BDF}").check()
    out = vm.run(f"viommu-vfio maplat {BDF} {count}", timeout=600).check().output
    match = re.search(r"map_median_ns=(\d+) unmap_median_ns=(\d+)", out)
    return int(match[1]) / 1000, int(match[2]) / 1000


def dma_throughput(vm: Machine) -> float:
    """MB/s of back-to-back 64 KiB copies by the DMA endpoint, every byte translated."""
    ep = vm.add_endpoint(1)
    vm.run(f"viommu-vfio bind {ep.sysfs_name}").check()
    out = vm.run(f"viommu-vfio dma {ep.sysfs_name} 0x100000 0x200000 {DMA_LEN} "
                 f"--repeat {DMA_REPEAT}", timeout=600).check().output
    ns = int(re.search(r" ns=(\d+)", out)[1])
    return DMA_LEN * DMA_REPEAT / (ns / 1e9) / 1e6


def fault_roundtrip(vm: Machine, count: int = 8) -> float:
    """Median ms from inject-event to the guest's line on the console (below Linux's rate
    limit of 10 lines per 5 s)."""
    samples = []
    for i in range(count):
        mark = vm.mark()
        started = time.monotonic()
        vm.inject("F_TRANSLATION", address=0x1000 * (i + 1))
        vm.wait_line(rf"page fault from EP \d+ at {0x1000 * (i + 1):#x} \[R\]$", since=mark)
        samples.append((time.monotonic() - started) * 1000)
    return statistics.median(samples)


def measure(maps: int) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="viommu-bench-") as tmp:
        workdir = Path(tmp)
        with _vm(workdir, "none", "none") as vm:
            results["boot_s_without_viommu"] = vm.boot_seconds
        with _vm(workdir, "qemu", "qemu") as vm:
            results["boot_s_qemu_virtio_iommu"] = vm.boot_seconds
            qemu_map, qemu_unmap = map_latency(vm, maps)
        with _vm(workdir, "viommu", "viommu") as vm:
            results["boot_s_with_viommu"] = vm.boot_seconds
            ours_map, ours_unmap = map_latency(vm, maps)
            results["fault_roundtrip_ms"] = fault_roundtrip(vm)
            results["dma_mbps"] = dma_throughput(vm)
            results["machine"] = {"accel": vm.accel,
                                  "kernel": vm.run("uname -r").check().output.strip()}
    results["map_latency_us"] = {"viommu": ours_map, "qemu_virtio_iommu_pci": qemu_map}
    results["unmap_latency_us"] = {"viommu": ours_unmap, "qemu_virtio_iommu_pci": qemu_unmap}
    results["map_latency_ratio_vs_qemu"] = ours_map / qemu_map
    results["unmap_latency_ratio_vs_qemu"] = ours_unmap / qemu_unmap
    results["boot_ratio"] = results["boot_s_with_viommu"] / results["boot_s_without_viommu"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--maps", type=int, default=2000, help="map/unmap iterations")
    args = parser.parse_args()
    results = measure(args.maps)
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:32} {value}")


if __name__ == "__main__":
    main()
