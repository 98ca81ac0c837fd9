"""Translation throughput: the Cython engine beside the pure-Python reference, same run.

Scenarios (each translation a 4-byte read of a different page, round robin):
  iotlb_hit    MAP-mode stream, 256 pages already in the IOTLB
  map_miss     MAP-mode stream over 1024 mappings, IOTLB disabled
  nested_walk  page-table stream: STE -> CD -> 4-level stage 1 (4 KiB, 48-bit VA), every
               CD and descriptor fetch and the output through the 4-level stage 2;
               IOTLB disabled
The engine is timed through its Python API (`translate`) and, as `*_c_loop`, through the
C fast path the endpoint model uses (`translate_c`, looped in C without the GIL). The
reference has no IOTLB, so it walks in every scenario.

    .venv/bin/python benchmarks/translate.py [--json] [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pagetables import GPA_BASE, GuestRam, ste, table_stream  # noqa: E402
from viommu._dataplane import READ, Engine  # noqa: E402
from viommu.device.mappings import Mapping, MappingTable  # noqa: E402
from viommu.testing.reference_walk import ReferenceEngine  # noqa: E402
from viommu.uapi import MapFlag  # noqa: E402

PAGE = 4096
SID = 0x100
RW = int(MapFlag.READ | MapFlag.WRITE)


def map_world(ram: GuestRam, npages: int) -> tuple[MappingTable, list[int]]:
    table = MappingTable()
    for i in range(npages):  # every other IOVA page, scattered over RAM
        table.add(Mapping(0x100_0000 + 2 * i * PAGE, 0x100_0000 + (2 * i + 1) * PAGE - 1,
                          GPA_BASE + (i * 7919 % (ram.size // PAGE)) * PAGE, RW))
    return table, [0x100_0000 + 2 * i * PAGE + 0x40 for i in range(npages)]


def nested_world(ram: GuestRam, engines: list, npages: int) -> list[int]:
    """One set of tables; every L0/L1/L2 index differs between neighbouring IOVAs."""
    tables = None
    for eng in engines:
        if tables is None:
            tables = table_stream(ram, eng, SID, asid=1)
        else:
            eng.set_stream_table(SID, *ste(tables.cd_gpa))
    iovas = []
    for i in range(npages):
        va = (i % 4) << 39 | (i % 7) << 30 | (i % 11) << 21 | i << 12
        tables.map(va, GPA_BASE + 0x20_0000 + (i % 64) * PAGE)
        iovas.append(va + 0x80)
    return iovas


def rate(call: Callable[[], int], seconds: float) -> float:
    """Translations per second of `call` (which returns how many it did)."""
    done, start = 0, time.perf_counter()
    while True:
        done += call()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def python_loop(engine, iovas: list[int]) -> Callable[[], int]:
    translate = engine.translate

    def run() -> int:
        for iova in iovas:
            translate(SID, -1, iova, 4, READ)
        return len(iovas)
    return run


def c_loop(engine: Engine, iovas: list[int], repeat: int) -> Callable[[], int]:
    packed = array("Q", iovas)

    def run() -> int:
        engine._bench_translate_c(SID, -1, packed, READ, repeat)
        return len(iovas) * repeat
    return run


def check_same(engine, reference, iovas: list[int]) -> None:
    for iova in iovas:
        got = engine.translate(SID, -1, iova, 4, READ)
        want = reference.translate(SID, -1, iova, 4, READ)
        if got != want or got[0] is None:
            raise SystemExit(f"benchmark set-up broken at {iova:#x}: {got} vs {want}")


def measure(seconds: float) -> dict[str, float]:
    mops: dict[str, float] = {}
    ram = GuestRam(64 << 20)

    table, iovas = map_world(ram, 1024)
    hit, miss, ref = Engine(ram.mem), Engine(ram.mem, iotlb_size=0), ReferenceEngine(ram.mem)
    for eng in (hit, miss, ref):
        eng.set_stream_map(SID, table, 1)
    check_same(miss, ref, iovas)
    warm = iovas[:256]
    check_same(hit, ref, warm)
    before = hit.iotlb_misses
    mops["iotlb_hit"] = rate(python_loop(hit, warm), seconds) / 1e6
    mops["iotlb_hit_c_loop"] = rate(c_loop(hit, warm, 200), seconds) / 1e6
    if hit.iotlb_misses != before:
        raise SystemExit("iotlb_hit scenario missed the IOTLB: the table is too small")
    mops["python_iotlb_hit"] = rate(python_loop(ref, warm), seconds) / 1e6
    mops["map_miss"] = rate(python_loop(miss, iovas), seconds) / 1e6
    mops["map_miss_c_loop"] = rate(c_loop(miss, iovas, 20), seconds) / 1e6
    mops["python_map_miss"] = rate(python_loop(ref, iovas), seconds) / 1e6

    walk, ref = Engine(ram.mem, iotlb_size=0), ReferenceEngine(ram.mem)
    iovas = nested_world(ram, [walk, ref], 256)
    check_same(walk, ref, iovas)
    mops["nested_walk"] = rate(python_loop(walk, iovas), seconds) / 1e6
    mops["nested_walk_c_loop"] = rate(c_loop(walk, iovas, 20), seconds) / 1e6
    mops["python_nested_walk"] = rate(python_loop(ref, iovas[:64]), seconds) / 1e6
    return mops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    parser.add_argument("--repeat", type=int, default=5, help="runs; figures are medians")
    args = parser.parse_args()
    runs = [measure(args.seconds) for _ in range(args.repeat)]
    mops = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    scenarios = ("iotlb_hit", "map_miss", "nested_walk")
    speedups = [{**{s: run[s] / run[f"python_{s}"] for s in scenarios},
                 **{f"{s}_c_loop": run[f"{s}_c_loop"] / run[f"python_{s}"] for s in scenarios}}
                for run in runs]
    speedup = {key: statistics.median(run[key] for run in speedups) for key in speedups[0]}
    if args.json:
        print(json.dumps({
            "translate_mops": {k: round(v, 4) for k, v in mops.items()},
            "translate_speedup_vs_python": {k: round(v, 1) for k, v in speedup.items()},
            "translate_speedup_spread": {k: [round(run[k], 1) for run in speedups]
                                         for k in speedup},
        }))
        return
    print(f"{'scenario':<14}{'engine':>12}{'engine C loop':>15}{'python ref':>13}"
          f"{'ratio':>9}{'ratio C':>10}   (million translations/s, medians of "
          f"{args.repeat})")
    for s in scenarios:
        print(f"{s:<14}{mops[s]:>12.3f}{mops[s + '_c_loop']:>15.3f}{mops['python_' + s]:>13.4f}"
              f"{speedup[s]:>8.0f}x{speedup[s + '_c_loop']:>9.0f}x")


if __name__ == "__main__":
    main()
