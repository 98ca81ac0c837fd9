"""Guest-side benchmarks, each beside its anchor in the same run: VFIO map/unmap latency
through our device, through our device in its null mode (every request answered S_OK,
nothing done: the transport's own cost) and through QEMU's in-process virtio-iommu-pci (same
guest kernel); the CPU each spends on that work; the same with two VMs of a kind mapping at
once on the host's cores (benchmarks/contended.py); boot time with and without our vIOMMU;
endpoint DMA throughput; the event path's latency in the backend and to the guest's line.

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

from contended import CONTENDED, contended_round, summarize_contended
from maplat import machine as vm_of
from maplat import map_latency, percentile, spread

from viommu.vm.machine import Machine

DMA_LEN = 64 * 1024
DMA_REPEAT = 200
EVENTS = 200  # single injections for the event path's latency
# name in the results -> Machine's `iommu` and the backend's arguments; boot baseline first
KINDS = {"none": ("none", ()), "viommu": ("viommu", ()),
         "viommu_null": ("viommu", ("--null-device",)), "qemu_virtio_iommu_pci": ("qemu", ())}
DEVICES = ("viommu", "viommu_null", "qemu_virtio_iommu_pci")  # whose latencies are compared
OURS, FLOOR, QEMU = DEVICES


def machine(workdir: Path, name: str, tag: str) -> Machine:
    return vm_of(workdir, name, tag, *KINDS[name])


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


def event_delivery(vm: Machine, count: int = EVENTS, gap_s: float = 0.002) -> dict:
    """Per injected event, as the backend measures it: from the control command's arrival
    to its record in the eventq's used ring and the driver notified (µs). One event at a
    time, `gap_s` apart, each once the one before reached the guest (the guest takes its
    records and re-posts their buffers in its interrupt handler: a record that finds no
    buffer would measure the guest, not the backend)."""
    first = None
    for i in range(count):
        deadline = time.monotonic() + 5
        while vm.backend("query-events", limit=0)["pending"] and time.monotonic() < deadline:
            time.sleep(0.001)
        reply = vm.inject("F_TRANSLATION", address=0x100000 + 0x1000 * i)
        first = reply["seq"] if first is None else first
        time.sleep(gap_s)
    trace = vm.backend("query-events", since=first - 1, limit=count)["trace"]
    samples = sorted(e["delivery_us"] for e in trace if "delivery_us" in e)
    return {"median": statistics.median(samples), "p99": percentile(samples, 0.99),
            "samples": len(samples), "injected": count,
            "event_thread": vm.backend("query-status")["event_thread"] is not None}


def run_round(workdir: Path, index: int, maps: int, last: bool) -> dict:
    """One VM of each kind: boot times, map latencies and CPU; then the contended runs; on
    the last round, the figures that need one VM only (DMA, events, machine)."""
    out: dict = {"boot_s": {}, "latency": {}}
    for name in KINDS:
        with machine(workdir, name, f"round{index}") as vm:
            out["boot_s"][name] = vm.boot_seconds
            if name not in DEVICES:
                continue
            out["latency"][name] = map_latency(vm, maps)
            if last and name == OURS:
                out["request_thread"] = vm.backend("query-status")["request_thread"]
                out["fault_roundtrip_ms"] = fault_roundtrip(vm)  # first: the guest's line
                out["event_delivery_us"] = event_delivery(vm)   # rate limit is not used up
                out["event_delivery_sparse_us"] = event_delivery(vm, gap_s=0.01)
                out["dma_mbps"] = dma_throughput(vm)
                out["machine"] = {"accel": vm.accel,
                                  "kernel": vm.run("uname -r").check().output.strip()}
    out["contended"] = {name: contended_round(workdir, name, f"round{index}", maps)
                        for name in CONTENDED}
    return out


def boot_round(workdir: Path, index: int) -> dict:
    """Boot times only: boot varies by a few percent from one boot to the next, more than
    the vIOMMU adds, so the ratio needs more boots than the latency rounds give."""
    boots = {}
    for name in ("none", OURS, QEMU):
        with machine(workdir, name, f"boot{index}") as vm:
            boots[name] = vm.boot_seconds
    return {"boot_s": boots}


def ratio_spread(rounds: list[dict], key: str, mine: str, theirs: str) -> tuple[float, dict]:
    """Ratio of the medians over rounds, and the spread of the per-round ratios."""
    ours = statistics.median(r["latency"][mine][key] for r in rounds)
    anchor = statistics.median(r["latency"][theirs][key] for r in rounds)
    return ours / anchor, spread([r["latency"][mine][key] / r["latency"][theirs][key]
                                  for r in rounds])


def summarize(rounds: list[dict], boot_only: list[dict], maps: int) -> dict:
    last = rounds[-1]
    results: dict = {key: last[key] for key in ("fault_roundtrip_ms", "dma_mbps", "machine",
                                                  "request_thread", "event_delivery_us",
                                                  "event_delivery_sparse_us")}
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
        key = f"{op}_median_us"
        (results[f"{op}_latency_ratio_vs_qemu"],
         results[f"{op}_latency_ratio_spread"]) = ratio_spread(rounds, key, OURS, QEMU)
        (results[f"{op}_latency_ratio_vs_floor"],
         results[f"{op}_latency_ratio_vs_floor_spread"]) = ratio_spread(rounds, key, OURS, FLOOR)
    cpu = {name: spread([r["latency"][name]["qemu_cpu_per_10k_s"] for r in rounds])
           for name in DEVICES}
    backend = {name: spread([r["latency"][name]["backend_cpu_per_10k_s"] for r in rounds])
               for name in (OURS, FLOOR)}
    results["backend_cpu_per_10k_maps_s"] = backend[OURS]["median"]
    # QEMU's device runs in the vCPU thread (TCG, no ioeventfd): its CPU is what QEMU spends
    # for the same guest work beyond a VM whose device does nothing (our null device).
    results["qemu_device_cpu_per_10k_maps_s"] = statistics.median(
        r["latency"][QEMU]["qemu_cpu_per_10k_s"] - r["latency"][FLOOR]["qemu_cpu_per_10k_s"]
        for r in rounds)
    results["cpu_per_10k_maps_s"] = {"backend": backend, "qemu_process": cpu}
    results.update(summarize_contended([r["contended"] for r in rounds]))
    every_boot = rounds + boot_only
    names = ("none", OURS, QEMU)
    boots = {kind: spread([r["boot_s"][kind] for r in every_boot]) for kind in names}
    results["boot_s_without_viommu"] = boots["none"]["median"]
    results["boot_s_with_viommu"] = boots[OURS]["median"]
    results["boot_s_qemu_virtio_iommu"] = boots[QEMU]["median"]
    results["boot_spread_s"] = boots
    results["boot_ratio"] = results["boot_s_with_viommu"] / results["boot_s_without_viommu"]
    results["boot_ratio_spread"] = spread([r["boot_s"][OURS] / r["boot_s"]["none"]
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
