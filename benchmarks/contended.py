"""Two VMs of a kind mapping at once: each boots, binds its endpoint to vfio-pci, and both
start `viommu-vfio maplat` together, so their vCPUs, QEMU and our backends (request threads
included) share the host's cores. Our device with its adaptive busy-poll window, our device
polling a fixed window (as before the window adapted), and QEMU's in-process
virtio-iommu-pci, a pair of each a round.

A round's figure for a kind is the mean of its two VMs' medians and the worse of their
p99s; the ratio is ours over QEMU's, of the medians over rounds.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
from pathlib import Path

from maplat import BDF, machine, map_latency, spread

CONTENDED = {"viommu": ("viommu", ()), "viommu_fixed_poll": ("viommu", ("--fixed-poll",)),
             "qemu_virtio_iommu_pci": ("qemu", ())}
VMS = 2


def contended_round(workdir: Path, name: str, tag: str, maps: int) -> dict:
    iommu, backend_args = CONTENDED[name]
    with contextlib.ExitStack() as stack:
        vms = [stack.enter_context(machine(workdir, f"contended-{name}", f"{tag}-{i}", iommu,
                                           backend_args)) for i in range(VMS)]
        for vm in vms:
            vm.run(f"viommu-vfio bind {BDF}").check()
        barrier = threading.Barrier(VMS)
        results: list[dict | None] = [None] * VMS
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = map_latency(vms[i], maps, bound=True, ready=barrier.wait)
            except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(VMS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        polls = [vm.backend("query-status")["request_thread"] for vm in vms] \
            if iommu == "viommu" else None
    return {"vms": results, "wall_s": max(r["wall_s"] for r in results),
            "request_threads": polls}


def _round_figures(run: dict) -> dict:
    vms = run["vms"]
    return {"median_us": statistics.mean(v["map_median_us"] for v in vms),
            "p90_us": max(v["map_percentiles_us"][90] for v in vms),
            "p99_us": max(v["map_percentiles_us"][99] for v in vms),
            "wall_s": run["wall_s"],
            "backend_cpu_per_10k_s": statistics.mean(v.get("backend_cpu_per_10k_s", 0)
                                                     for v in vms),
            "qemu_cpu_per_10k_s": statistics.mean(v["qemu_cpu_per_10k_s"] for v in vms)}


def summarize_contended(rounds: list[dict]) -> dict:
    """`rounds`: each round's {kind: contended_round()}."""
    figures = {name: [_round_figures(r[name]) for r in rounds] for name in CONTENDED}
    summary = {name: {key: spread([f[key] for f in per_round]) for key in per_round[0]}
               for name, per_round in figures.items()}
    ours, qemu = summary["viommu"], summary["qemu_virtio_iommu_pci"]
    return {
        "map_latency_ratio_contended": ours["median_us"]["median"] / qemu["median_us"]["median"],
        "map_latency_ratio_contended_spread": spread([
            o["median_us"] / q["median_us"]
            for o, q in zip(figures["viommu"], figures["qemu_virtio_iommu_pci"], strict=True)]),
        "contended": summary,
        "contended_percentiles_us": {name: [[v["map_percentiles_us"] for v in r[name]["vms"]]
                                            for r in rounds] for name in CONTENDED},
        "contended_request_threads": rounds[-1]["viommu"]["request_threads"],
    }
