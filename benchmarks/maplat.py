"""What the guest benchmarks share: a VM of a kind, and the guest's VFIO map/unmap latency
(`viommu-vfio maplat`) with the CPU the backend and QEMU spend meanwhile."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cpu import CpuMeter

from viommu.vm.machine import Machine

BDF = "0000:01:00.0"  # the default profile's endpoint


def machine(workdir: Path, name: str, tag: str, iommu: str,
            backend_args: Sequence[str] = ()) -> Machine:
    return Machine("default", workdir=workdir / f"{name}-{tag}", name=f"{name}-{tag}",
                   iommu=iommu, backend_args=backend_args)


def map_latency(vm: Machine, count: int, bound: bool = False,
                ready: Callable[[], object] | None = None) -> dict:
    """Guest VFIO map and unmap of 4 KiB, `count` times: medians and percentiles 0..100 in
    µs, and the CPU seconds per 10,000 pairs that the backend and QEMU spent on them
    (`bound`: the endpoint is bound to vfio-pci already; `ready` is called just before the
    timed run).

    The CPU per pair is that of a `count`-pair run less that of a 1-pair run, over
    `count - 1`: what the command costs besides the pairs (the console, starting the tool,
    opening VFIO) is left out."""
    if not bound:
        vm.run(f"viommu-vfio bind {BDF}").check()
    backend_pid = vm.backend_pid if vm.profile.iommu == "viommu" else None
    with CpuMeter(backend=backend_pid, qemu=vm.qemu_pid) as fixed:
        vm.run(f"viommu-vfio maplat {BDF} 1").check()
    if ready is not None:
        ready()
    started = time.monotonic()
    with CpuMeter(backend=backend_pid, qemu=vm.qemu_pid) as cpu:
        out = vm.run(f"viommu-vfio maplat {BDF} {count}", timeout=900).check().output
    wall = time.monotonic() - started
    result = {f"{who}_cpu_per_10k_s": (seconds - fixed.seconds[who]) * 10_000 / (count - 1)
              for who, seconds in cpu.seconds.items()}
    result["wall_s"] = wall
    for op in ("map", "unmap"):
        result[f"{op}_median_us"] = int(re.search(rf"{op}_median_ns=(\d+)", out)[1]) / 1000
        line = re.search(rf"{op}_percentiles_ns=([\d,]+)", out)[1]
        result[f"{op}_percentiles_us"] = [int(v) / 1000 for v in line.split(",")]
    return result


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}
