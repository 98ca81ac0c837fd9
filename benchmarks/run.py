"""Run every benchmark, print one table of figures and ratios, write bench-results.json.

    ./scripts/bench [--rounds N] [--maps N]    (set-up first, then this)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from blk import forwarded_args as blk_args
from blk import table_rows as blk_rows
from plot import plot

from viommu.vm import paths

ROOT = Path(__file__).resolve().parents[1]  # the checkout: results are written there

HERE = Path(__file__).resolve().parent


def run_json(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / script), "--json", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def qemu_version() -> str:
    out = subprocess.run([paths.qemu_binary(), "--version"], capture_output=True,
                         text=True).stdout
    return out.splitlines()[0] if out else "unknown"


def _range(spread: dict, fmt: str = ".1f") -> str:
    return f"[{spread['min']:{fmt}}-{spread['max']:{fmt}}]"


def table(results: dict) -> str:
    rows = []
    for op in ("map", "unmap"):
        lat, spread = results[f"{op}_latency_us"], results[f"{op}_latency_spread_us"]
        ratio = results[f"{op}_latency_ratio_spread"]
        rows.append((f"guest VFIO {op} 4 KiB, median µs",
                     f"{lat['viommu']:.1f} {_range(spread['viommu'])}",
                     f"QEMU virtio-iommu-pci {lat['qemu_virtio_iommu_pci']:.1f} "
                     f"{_range(spread['qemu_virtio_iommu_pci'])}",
                     f"{results[f'{op}_latency_ratio_vs_qemu']:.2f} {_range(ratio, '.2f')}"
                     + ("  (target < 1.0)" if op == "map" else "")))
    mops, speedup = results["translate_mops"], results["translate_speedup_vs_python"]
    for kind in ("iotlb_hit", "map_miss", "nested_walk"):
        # In C, as endpoint DMA uses the engine; then one call at a time from Python.
        rows.append((f"engine translations/s, {kind} (M)",
                     f"{mops[kind + '_c_loop']:.2f} (from Python {mops[kind]:.2f})",
                     f"pure Python {mops['python_' + kind]:.3f}",
                     f"{speedup[kind + '_c_loop']:.0f}x (from Python {speedup[kind]:.0f}x)"
                     + ("  (target >= 50)" if kind == "iotlb_hit" else "")))
    rows += [
        ("endpoint DMA 64 KiB, guest tool (MB/s)", f"{results['dma_mbps']:.0f}", "", ""),
        ("engine DMA 64 KiB (MB/s)", f"{results['engine_dma_mbps']:.0f}",
         f"stage-1 bypass {results['identity_dma_mbps']:.0f}",
         f"overhead {results['dma_translation_overhead']:+.1%}  (target <= 10%)"),
        ("boot to shell, s", f"{results['boot_s_with_viommu']:.2f}",
         f"no vIOMMU {results['boot_s_without_viommu']:.2f}, QEMU virtio-iommu-pci "
         f"{results['boot_s_qemu_virtio_iommu']:.2f}",
         f"{results['boot_ratio']:.2f} {_range(results['boot_ratio_spread'], '.2f')}"
         "  (target <= 1.05)"),
        ("fault round trip inject -> guest line, median ms",
         f"{results['fault_roundtrip_ms']:.1f}", "", ""),
    ] + blk_rows(results)
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, width, strict=True))
                     for r in rows)


def main() -> None:
    results: dict = {}
    print("==> engine translation benchmark", flush=True)
    results.update(run_json("translate.py"))
    print("==> engine DMA benchmark", flush=True)
    results.update(run_json("engine_dma.py"))
    print("==> guest benchmarks (rounds of three VMs: none, QEMU's, ours)", flush=True)
    results.update(run_json("guest.py", *sys.argv[1:]))
    print("==> guest block I/O (rounds of three VMs: our virtio-blk, QEMU's with its "
          "virtio-iommu, QEMU's without an IOMMU)", flush=True)
    results.update(run_json("blk.py", *blk_args(sys.argv[1:])))
    results["machine"].update(cores=os.cpu_count(), qemu=qemu_version())
    out = ROOT / "bench-results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, ROOT / "bench-latency.png")
    print(table(results))
    print(f"machine: {results['machine']}")
    print(f"request thread: {results['request_thread']}")
    print("written: bench-results.json, bench-latency.png")


if __name__ == "__main__":
    main()
