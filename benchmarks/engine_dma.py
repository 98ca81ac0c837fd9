"""Endpoint DMA cost of translation, measured in-process: 64 KiB copies through the
endpoint's translating DMA port (MAP mode: stage 1 translates every page) against the same
copies on a bypass stream (identity: stage 1 off, addresses used as guest-physical), both
through the engine's C copy.

    .venv/bin/python benchmarks/engine_dma.py [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "unit")]  # the test suite's guest-memory helpers

from pagetables import GuestRam  # noqa: E402
from test_requests import ALL_FEATURES, EP, EP2, attach, map_  # noqa: E402
from viommu.dataplane.translation import Translator  # noqa: E402
from viommu.device.virtio_iommu import VirtioIommuDevice  # noqa: E402
from viommu.endpoints.dma_port import TranslatingDma  # noqa: E402
from viommu.uapi import VIRTIO_IOMMU_ATTACH_F_BYPASS  # noqa: E402
from virtio_driver import FakeDriver  # noqa: E402

LENGTH = 64 * 1024
SRC_IOVA, DST_IOVA = 0x100000, 0x200000


def setup():
    ram = GuestRam(size=4 << 20)
    ram._next = ram.base + (1 << 20)  # the driver's rings use the first MiB
    driver = FakeDriver(ram=ram.buf, mem=ram.mem)
    device = VirtioIommuDevice([EP, EP2])
    device.driver_features = ALL_FEATURES
    translator = Translator(device, relay=None)
    translator.memory_changed(ram.mem)
    src, dst = ram.alloc(LENGTH), ram.alloc(LENGTH)
    for body in (attach(1, EP), map_(1, SRC_IOVA, SRC_IOVA + LENGTH - 1, src),
                 map_(1, DST_IOVA, DST_IOVA + LENGTH - 1, dst),
                 attach(2, EP2, flags=VIRTIO_IOMMU_ATTACH_F_BYPASS)):
        driver.post(body, 4)
        driver.vq.process_requests(device.handle_request)
    return TranslatingDma(translator, EP), TranslatingDma(translator, EP2), src, dst


def rate(copy, seconds: float = 1.0) -> float:
    """MB/s of 64 KiB copies."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(16):
            copy()
        done += 16
    return done * LENGTH / (time.perf_counter() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=5, help="runs; figures are medians")
    args = parser.parse_args()
    translating, bypass, src, dst = setup()
    assert translating.copy(None, SRC_IOVA, DST_IOVA, LENGTH) is None
    assert bypass.copy(None, src, dst, LENGTH) is None
    runs = []
    for _ in range(args.repeat):  # alternate, so drift hits both alike
        translated = rate(lambda: translating.copy(None, SRC_IOVA, DST_IOVA, LENGTH), 0.5)
        identity = rate(lambda: bypass.copy(None, src, dst, LENGTH), 0.5)
        runs.append((translated, identity, identity / translated - 1))
    translated, identity, overhead = (statistics.median(col) for col in zip(*runs, strict=True))
    result = {"engine_dma_mbps": translated, "identity_dma_mbps": identity,
              "dma_translation_overhead": overhead,
              "dma_translation_overhead_spread": [round(run[2], 4) for run in runs]}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")


if __name__ == "__main__":
    main()
