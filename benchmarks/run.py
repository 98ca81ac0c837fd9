"""Run every benchmark, print one table of figures and ratios, write bench-results.json.

    ./scripts/bench [--rounds N] [--maps N] [--boot-rounds N]    (set-up first, then this)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from blk import table_rows as blk_rows

from viommu.vm import paths

ROOT = Path(__file__).resolve().parents[1]  # the checkout: results are written there

HERE = Path(__file__).resolve().parent


def run_json(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / script), "--json", *args],
                          capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join(proc.stderr.splitlines()[-40:])
        raise SystemExit(f"{script} exited {proc.returncode}:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def qemu_version() -> str:
    out = subprocess.run([paths.qemu_binary(), "--version"], capture_output=True,
                         text=True).stdout
    return out.splitlines()[0] if out else "unknown"


def _range(spread: dict, fmt: str = ".1f") -> str:
    return f"[{spread['min']:{fmt}}-{spread['max']:{fmt}}]"


def _target(ok: bool, text: str) -> str:
    return f"  (target {text}: {'met' if ok else 'NOT met'})"


def latency_rows(results: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for op in ("map", "unmap"):
        lat, spread = results[f"{op}_latency_us"], results[f"{op}_latency_spread_us"]
        ratio, ratio_spread = (results[f"{op}_latency_ratio_vs_qemu"],
                               results[f"{op}_latency_ratio_spread"])
        target = (_target(ratio <= 0.7 and ratio_spread["max"] < 1.0, "<= 0.7, spread < 1.0")
                  if op == "map" else "")
        rows.append((f"guest VFIO {op} 4 KiB, median µs",
                     f"{lat['viommu']:.1f} {_range(spread['viommu'])}",
                     f"QEMU virtio-iommu-pci {lat['qemu_virtio_iommu_pci']:.1f} "
                     f"{_range(spread['qemu_virtio_iommu_pci'])}",
                     f"{ratio:.2f} {_range(ratio_spread, '.2f')}{target}"))
        floor = results[f"{op}_latency_ratio_vs_floor"]
        rows.append(("  ... beside the floor (null device)", "",
                     f"--null-device {lat['viommu_null']:.1f} {_range(spread['viommu_null'])}",
                     f"{floor:.2f} "
                     f"{_range(results[f'{op}_latency_ratio_vs_floor_spread'], '.2f')}"
                     + (_target(floor <= 1.1, "<= 1.1") if op == "map" else "")))
        pct = {d: [statistics.median(r[i] for r in rounds) for i in (90, 99)]
               for d, rounds in results[f"{op}_latency_percentiles_us"].items()}
        rows.append(("  ... p90 / p99 µs", "{:.1f} / {:.1f}".format(*pct["viommu"]),
                     "QEMU {:.1f} / {:.1f}; floor {:.1f} / {:.1f}".format(
                         *pct["qemu_virtio_iommu_pci"], *pct["viommu_null"]), ""))
    c = results["contended"]
    ours, qemu, fixed = c["viommu"], c["qemu_virtio_iommu_pci"], c["viommu_fixed_poll"]
    ratio = results["map_latency_ratio_contended"]
    rows += [
        ("two VMs mapping at once: map median µs",
         f"{ours['median_us']['median']:.1f} {_range(ours['median_us'])}",
         f"QEMU {qemu['median_us']['median']:.1f} {_range(qemu['median_us'])}",
         f"{ratio:.2f} {_range(results['map_latency_ratio_contended_spread'], '.2f')}"
         + _target(ratio <= 1.0, "<= 1.0")),
        ("  ... p99 µs (worse VM of the pair)", f"{ours['p99_us']['median']:.1f}",
         f"QEMU {qemu['p99_us']['median']:.1f}", _target(
             ours["p99_us"]["median"] <= qemu["p99_us"]["median"], "ours <= QEMU's").strip()),
        ("  ... fixed 200 µs poll window instead", f"{fixed['median_us']['median']:.1f}",
         f"p99 {fixed['p99_us']['median']:.1f}", ""),
        ("  ... both VMs done, s", f"{ours['wall_s']['median']:.2f}",
         f"QEMU {qemu['wall_s']['median']:.2f}; fixed poll {fixed['wall_s']['median']:.2f}",
         ""),
    ]
    cpu = results["cpu_per_10k_maps_s"]
    rows += [
        ("CPU s per 10,000 MAP/UNMAP pairs", f"backend {results['backend_cpu_per_10k_maps_s']:.3f}",
         f"QEMU's device {results['qemu_device_cpu_per_10k_maps_s']:.3f}",
         f"(floor's backend {cpu['backend']['viommu_null']['median']:.3f})"),
        ("  ... two VMs mapping at once, backend", f"{ours['backend_cpu_per_10k_s']['median']:.3f}",
         f"fixed poll {fixed['backend_cpu_per_10k_s']['median']:.3f}", ""),
    ]
    return rows


def table(results: dict) -> str:
    rows = latency_rows(results)
    mops, speedup = results["translate_mops"], results["translate_speedup_vs_python"]
    for kind in ("iotlb_hit", "map_miss", "nested_walk"):
        # In C, as endpoint DMA uses the engine; then one call at a time from Python.
        rows.append((f"engine translations/s, {kind} (M)",
                     f"{mops[kind + '_c_loop']:.2f} (from Python {mops[kind]:.2f})",
                     f"pure Python {mops['python_' + kind]:.3f}",
                     f"{speedup[kind + '_c_loop']:.0f}x (from Python {speedup[kind]:.0f}x)"
                     + ("  (target >= 50)" if kind == "iotlb_hit" else "")))
    events, sparse = results["event_delivery_us"], results["event_delivery_sparse_us"]
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
        ("event delivery in the backend, 2 ms apart, µs", f"median {events['median']:.1f}",
         f"p99 {events['p99']:.1f} ({events['samples']} events)",
         _target(events["median"] <= 50, "median <= 50").strip()),
        ("  ... 10 ms apart", f"median {sparse['median']:.1f}",
         f"p99 {sparse['p99']:.1f} ({sparse['samples']} events)", ""),
        ("fault round trip inject -> guest line, median ms",
         f"{results['fault_roundtrip_ms']:.1f}", "", ""),
    ] + blk_rows(results)
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, width, strict=True))
                     for r in rows)


def count(least: int):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= {least}")
        return int(text)
    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Checked before anything runs: a typo should not cost a half-hour run."""
    parser = argparse.ArgumentParser(
        prog="./scripts/bench", description="Run every benchmark and print figures beside "
        "their anchors as ratios; writes bench-results.json and bench-latency.png.")
    parser.add_argument("--rounds", type=count(1), default=3,
                        help="VMs of each kind booted, per benchmark (default 3)")
    parser.add_argument("--maps", type=count(1), default=2000,
                        help="map/unmap iterations a round (default 2000)")
    parser.add_argument("--boot-rounds", type=count(0), default=6,
                        help="further boots of each kind, for the boot ratio (default 6)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args(sys.argv[1:])
    rounds = ["--rounds", str(args.rounds)]
    results: dict = {}
    print("==> engine translation benchmark", flush=True)
    results.update(run_json("translate.py"))
    print("==> engine DMA benchmark", flush=True)
    results.update(run_json("engine_dma.py"))
    print("==> guest benchmarks (rounds of VMs: none, ours, ours as a null device, QEMU's; "
          "then pairs mapping at once)", flush=True)
    results.update(run_json("guest.py", *rounds, "--maps", str(args.maps),
                            "--boot-rounds", str(args.boot_rounds)))
    print("==> guest block I/O (rounds of three VMs: our virtio-blk, QEMU's with its "
          "virtio-iommu, QEMU's without an IOMMU)", flush=True)
    results.update(run_json("blk.py", *rounds))
    results["machine"].update(cores=os.cpu_count(), qemu=qemu_version())
    out = ROOT / "bench-results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    from plot import plot  # matplotlib: the bench extra, needed only now
    plot(results, ROOT / "bench-latency.png")
    print(table(results))
    print(f"machine: {results['machine']}")
    print(f"request thread: {results['request_thread']}")
    print(f"request threads, two VMs mapping at once: {results['contended_request_threads']}")
    print("written: bench-results.json, bench-latency.png")


if __name__ == "__main__":
    main()
