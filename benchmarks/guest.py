"""Guest-side benchmarks, each beside its anchor in the same run: VFIO map/unmap latency
through our device and through QEMU's in-process virtio-iommu-pci (same guest kernel), boot
time with and without our vIOMMU, endpoint DMA throughput, and the fault round trip.

Each round boots one VM of each kind, interleaved so that a slow patch of the machine hits
all of them; figures are medians over the rounds, and the JSON keeps every round. Boot
rounds add boots only, for the boot ratio.

    .venv/bin/python benchmarks/guest.py [--json] [--rounds 3] [--maps 2000] [--boot-rounds 6]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from viommu.vm.machine import Machine

BDF = "0000:01:00.0"
DMA_LEN = 64 * 1024
DMA_REPEAT = 200
# name in the results -> Machine's `iommu`; boot-time baseline first
KINDS = {"none": "none", "viommu": "viommu", "qemu_virtio_iommu_pci": "qemu"}
DEVICES = ("viommu", "qemu_virtio_iommu_pci")  # the two whose latencies are compared


def map_latency(vm: Machine, count: int) -> dict:
    """Guest VFIO map and unmap of 4 KiB, `count` times (viommu-vfio maplat): medians and
    percentiles 0..100, in µs."""
    vm.run(f"viommu-vfio bind {BDF}").check()
    out = vm.run(f"viommu-vfio maplat {BDF} {count}", timeout=600).check().output
    result = {}
    for op in ("map", "unmap"):
        result[f"{op}_median_us"] = int(re.search(rf"{op}_median_ns=(\d+)", out)[1]) / 1000
        line = re.search(rf"{op}_percentiles_ns=([\d,]+)", out)[1]
        result[f"{op}_percentiles_us"] = [int(v) / 1000 for v in line.split(",")]
    return result


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


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def run_round(workdir: Path, index: int, maps: int, last: bool) -> dict:
    """One VM of each kind: boot times, map latencies; on the last round, the figures
    that need one VM only (DMA, fault round trip, machine)."""
    out: dict = {"boot_s": {}, "latency": {}}
    for name in KINDS:
        with _machine(workdir, name, f"round{index}") as vm:
            out["boot_s"][name] = vm.boot_seconds
            if name not in DEVICES:
                continue
            out["latency"][name] = map_latency(vm, maps)
            if last and name == "viommu":
                out["fault_roundtrip_ms"] = fault_roundtrip(vm)
                out["dma_mbps"] = dma_throughput(vm)
                out["request_thread"] = vm.backend("query-status")["request_thread"]
                out["machine"] = {"accel": vm.accel,
                                  "kernel": vm.run("uname -r").check().output.strip()}
    return out


def boot_round(workdir: Path, index: int) -> dict:
    """Boot times only: boot varies by a few percent from one boot to the next, more than
    the vIOMMU adds, so the ratio needs more boots than the latency rounds give."""
    boots = {}
    for name in KINDS:
        with _machine(workdir, name, f"boot{index}") as vm:
            boots[name] = vm.boot_seconds
    return {"boot_s": boots}


def _machine(workdir: Path, name: str, tag: str) -> Machine:
    return Machine("default", workdir=workdir / f"{name}-{tag}", name=f"{name}-{tag}",
                   iommu=KINDS[name])


def summarize(rounds: list[dict], boot_only: list[dict], maps: int) -> dict:
    last = rounds[-1]
    results: dict = {key: last[key] for key in ("fault_roundtrip_ms", "dma_mbps", "machine",
                                                  "request_thread")}
    results["rounds"] = len(rounds)
    results["maps_per_round"] = maps
    for op in ("map", "unmap"):
        per_device = {name: spread([r["latency"][name][f"{op}_median_us"] for r in rounds])
                      for name in DEVICES}
        results[f"{op}_latency_us"] = {name: s["median"] for name, s in per_device.items()}
        results[f"{op}_latency_spread_us"] = per_device
        results[f"{op}_latency_percentiles_us"] = {
            name: [r["latency"][name][f"{op}_percentiles_us"] for r in rounds]
            for name in DEVICES}
        ratios = [r["latency"]["viommu"][f"{op}_median_us"]
                  / r["latency"]["qemu_virtio_iommu_pci"][f"{op}_median_us"] for r in rounds]
        results[f"{op}_latency_ratio_vs_qemu"] = (results[f"{op}_latency_us"]["viommu"]
                                                  / results[f"{op}_latency_us"][
                                                      "qemu_virtio_iommu_pci"])
        results[f"{op}_latency_ratio_spread"] = spread(ratios)
    every_boot = rounds + boot_only
    boots = {kind: spread([r["boot_s"][kind] for r in every_boot]) for kind in KINDS}
    results["boot_s_without_viommu"] = boots["none"]["median"]
    results["boot_s_with_viommu"] = boots["viommu"]["median"]
    results["boot_s_qemu_virtio_iommu"] = boots["qemu_virtio_iommu_pci"]["median"]
    results["boot_spread_s"] = boots
    results["boot_ratio"] = results["boot_s_with_viommu"] / results["boot_s_without_viommu"]
    results["boot_ratio_spread"] = spread([r["boot_s"]["viommu"] / r["boot_s"]["none"]
                                           for r in every_boot])
    return results


def measure(maps: int, rounds: int, boot_rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="viommu-bench-") as tmp:
        done = [run_round(Path(tmp), i, maps, last=i == rounds - 1) for i in range(rounds)]
        boots = [boot_round(Path(tmp), i) for i in range(boot_rounds)]
    return summarize(done, boots, maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--maps", type=int, default=2000, help="map/unmap iterations a round")
    parser.add_argument("--rounds", type=int, default=3, help="VMs of each kind booted")
    parser.add_argument("--boot-rounds", type=int, default=6,
                        help="further boots of each kind, for the boot ratio")
    args = parser.parse_args()
    results = measure(args.maps, args.rounds, args.boot_rounds)
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        if not key.endswith("percentiles_us"):
            print(f"{key:32} {value}")


if __name__ == "__main__":
    main()
