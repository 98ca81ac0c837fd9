"""Latency distributions of guest VFIO map and unmap, our device beside QEMU's in-process
virtio-iommu-pci, from bench-results.json: one CDF a round and device.

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
          "qemu_virtio_iommu_pci": "QEMU virtio-iommu-pci (in process)"}
COLORS = {"viommu": "tab:blue", "qemu_virtio_iommu_pci": "tab:orange"}


def plot(results: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    percent = list(range(101))
    for ax, op in zip(axes, ("map", "unmap"), strict=True):
        for device, rounds in results[f"{op}_latency_percentiles_us"].items():
            for i, curve in enumerate(rounds):
                ax.plot(curve, percent, color=COLORS[device], alpha=0.8, linewidth=1.2,
                        label=LABELS[device] if i == 0 else None)
            ax.axvline(results[f"{op}_latency_us"][device], color=COLORS[device],
                       linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"guest VFIO {op} of 4 KiB, µs (log)")
        ax.set_title(f"{op}: median ratio {results[f'{op}_latency_ratio_vs_qemu']:.2f}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("percent of calls at or below")
    axes[0].legend(loc="lower right", fontsize=8)
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
