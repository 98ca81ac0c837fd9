"""Latency distributions from bench-results.json, one CDF a round and device: guest VFIO map
and unmap through our device, its null mode (the transport's floor) and QEMU's in-process
virtio-iommu-pci; and, beside them, map with two VMs of a kind mapping at once (our device
with its adaptive poll window, with a fixed one, and QEMU's).

    .venv/bin/python benchmarks/plot.py [bench-results.json] [-o bench-latency.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a CI machine
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"viommu": "viommu (out of process)",
          "viommu_null": "viommu --null-device (transport floor)",
          "viommu_fixed_poll": "viommu, fixed 200 µs poll window",
          "qemu_virtio_iommu_pci": "QEMU virtio-iommu-pci (in process)"}
COLORS = {"viommu": "tab:blue", "viommu_null": "tab:gray", "viommu_fixed_poll": "tab:red",
          "qemu_virtio_iommu_pci": "tab:orange"}
PERCENT = list(range(101))


def _curves(ax, per_device: dict) -> None:
    for device, rounds in per_device.items():
        for i, curve in enumerate(rounds):
            ax.plot(curve, PERCENT, color=COLORS[device], alpha=0.75, linewidth=1.1,
                    label=LABELS[device] if i == 0 else None)


def _style(ax, xlabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)


def plot(results: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), sharey=True)
    for ax, op in zip(axes, ("map", "unmap"), strict=False):
        _curves(ax, results[f"{op}_latency_percentiles_us"])
        for device, median in results[f"{op}_latency_us"].items():
            ax.axvline(median, color=COLORS[device], linestyle=":", linewidth=1)
        _style(ax, f"guest VFIO {op} of 4 KiB, µs (log)",
               f"{op}: ours/QEMU {results[f'{op}_latency_ratio_vs_qemu']:.2f}, "
               f"ours/floor {results[f'{op}_latency_ratio_vs_floor']:.2f}")
    contended = {device: [curve for pair in rounds for curve in pair]
                 for device, rounds in results["contended_percentiles_us"].items()}
    _curves(axes[2], contended)
    _style(axes[2], "map of 4 KiB, two VMs of a kind mapping at once, µs (log)",
           f"contended map: ours/QEMU {results['map_latency_ratio_contended']:.2f}")
    axes[0].set_ylabel("percent of calls at or below")
    machine = results.get("machine", {})
    fig.suptitle(f"{results['rounds']} rounds x {results['maps_per_round']} calls, "
                 f"{machine.get('accel', '?').upper()}, {machine.get('cores', '?')} cores, "
                 f"guest {machine.get('kernel', '?')}; dotted: medians", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="bench-results.json")
    parser.add_argument("-o", "--output", default="bench-latency.png")
    args = parser.parse_args()
    plot(json.loads(Path(args.results).read_text()), Path(args.output))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
