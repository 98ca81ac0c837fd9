"""Run every benchmark, print one table of figures and ratios, write bench-results.json.

    ./scripts/bench            (set-up first, then this)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from viommu import paths

HERE = Path(__file__).resolve().parent


def run_json(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / script), "--json", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def qemu_version() -> str:
    out = subprocess.run([paths.qemu_binary(), "--version"], capture_output=True,
                         text=True).stdout
    return out.splitlines()[0] if out else "unknown"


def table(results: dict) -> str:
    lat, unlat = results["map_latency_us"], results["unmap_latency_us"]
    rows = [
        ("guest VFIO map 4 KiB, median µs", f"{lat['viommu']:.1f}",
         f"QEMU virtio-iommu-pci {lat['qemu_virtio_iommu_pci']:.1f}",
         f"{results['map_latency_ratio_vs_qemu']:.2f}  (target < 1.0)"),
        ("guest VFIO unmap 4 KiB, median µs", f"{unlat['viommu']:.1f}",
         f"QEMU virtio-iommu-pci {unlat['qemu_virtio_iommu_pci']:.1f}",
         f"{results['unmap_latency_ratio_vs_qemu']:.2f}"),
    ]
    mops = results["translate_mops"]
    for kind in ("iotlb_hit", "map_miss", "nested_walk"):
        rows.append((f"engine translations/s, {kind} (M)", f"{mops[kind]:.2f}",
                     f"pure Python {mops['python_' + kind]:.3f}",
                     f"{results['translate_speedup_vs_python'][kind]:.0f}x"
                     + ("  (target >= 50)" if kind == "iotlb_hit" else "")))
    rows += [
        ("endpoint DMA 64 KiB, guest tool (MB/s)", f"{results['dma_mbps']:.0f}", "", ""),
        ("engine DMA 64 KiB (MB/s)", f"{results['engine_dma_mbps']:.0f}",
         f"stage-1 bypass {results['identity_dma_mbps']:.0f}",
         f"overhead {results['dma_translation_overhead']:+.1%}  (target <= 10%)"),
        ("boot to shell, s", f"{results['boot_s_with_viommu']:.2f}",
         f"no vIOMMU {results['boot_s_without_viommu']:.2f}",
         f"{results['boot_ratio']:.2f}  (target <= 1.05)"),
        ("fault round trip inject -> guest line, median ms",
         f"{results['fault_roundtrip_ms']:.1f}", "", ""),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, width, strict=True))
                     for r in rows)


def main() -> None:
    results: dict = {}
    print("==> engine translation benchmark", flush=True)
    results.update(run_json("translate.py"))
    print("==> engine DMA benchmark", flush=True)
    results.update(run_json("engine_dma.py"))
    print("==> guest benchmarks (boots three VMs)", flush=True)
    results.update(run_json("guest.py"))
    results["machine"].update(cores=os.cpu_count(), qemu=qemu_version())
    (paths.ROOT / "bench-results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"machine: {results['machine']}")
    print("written: bench-results.json")


if __name__ == "__main__":
    main()
