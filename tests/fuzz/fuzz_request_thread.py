"""Fuzz the requestq thread (ext/requestq.pxi, viommu.dataplane.requestq) against the Python path.

The fuzzer writes the same chains into two guests' rings: MAP and UNMAP with any fields
(domains that exist or not, any alignment, flags, reserved words, the reserved MSI window),
ATTACH/DETACH/PROBE, unknown types, requests cut short, missing or small tails, buffers
outside guest RAM, split descriptors; several chains per kick. Guest A is served by a
RequestService thread (MAP/UNMAP in C, the rest handed to Python), guest B by
`VirtQueue.process_requests` on the same device rules. After every batch both must have
answered every chain, with the same used lengths and the same bytes in every writable
buffer, and hold the same mappings; after the last, the same request counters. The thread
must answer within seconds (no hang) and leave no fd or thread behind.
"""

from __future__ import annotations

import sys

import atheris
import fuzzutil
from fuzzutil import check, pick

sys.path.insert(0, str(fuzzutil.TESTS_DIR / "unit"))  # the request builders

with fuzzutil.instrumented(__name__):
    from threaded_ring import (
        ThreadServedRing,  # imports viommu.dataplane.requestq: instrumented too
    )
    from viommu._dataplane import RingError
    from viommu.device.virtio_iommu import DeviceConfig, VirtioIommuDevice

from test_requests import ALL_FEATURES, attach, detach, map_, probe, unmap  # noqa: E402
from virtio_driver import FakeDriver  # noqa: E402

ENDPOINTS = (1, 256)
CONFIG = DeviceConfig(max_mappings_per_domain=4, max_mappings=6)
PAGE = 0x1000
ADDRS = (0, PAGE, 2 * PAGE, 3 * PAGE, 0x800, 0xFEE0_0000, (1 << 48) - PAGE, (1 << 64) - PAGE)
ANSWER_TIMEOUT = 5.0


class Guest:
    """One guest ring and its device, served by the request thread or by Python."""

    def __init__(self, served_by_thread: bool, poll_us: float) -> None:
        device = VirtioIommuDevice(ENDPOINTS, CONFIG)
        device.driver_features = ALL_FEATURES
        self.ring = ThreadServedRing(device, poll_us, mem_size=1 << 20) \
            if served_by_thread else None
        self.driver = self.ring.driver if self.ring else FakeDriver(queue_size=64,
                                                                    mem_size=1 << 20)
        self.device = device
        self.python_ring_error = False

    @property
    def ring_error(self) -> bool:
        return bool(self.ring.ring_errors) if self.ring else self.python_ring_error

    def post(self, chain: list[tuple[bytes | None, int, bool]]) -> list[tuple[int, int]]:
        """Publish one chain of (data or None for a buffer outside RAM, length, writable);
        returns (guest-physical address, length) of each writable buffer."""
        segments, writable = [], []
        for data, length, is_writable in chain:
            if data is None:
                segments.append((0x10, length, is_writable))  # below guest RAM
                continue
            gpa = self.driver.alloc(length)
            if not is_writable:
                self.driver.write(gpa, data)
            else:
                writable.append((gpa, length))
            segments.append((gpa, length, is_writable))
        self.driver.publish(self.driver.add_chain(segments))
        return writable

    def serve(self, expected_used: int) -> None:
        if self.ring is None:
            try:
                self.driver.vq.process_requests(self.device.handle_request)
            except RingError:
                self.python_ring_error = True
            return
        self.ring.kick_now()
        self.ring.wait_used(expected_used, ANSWER_TIMEOUT)

    def mappings(self) -> dict:
        return {d: [(m.virt_start, m.virt_end, m.phys_start, m.flags) for m in dom.mappings]
                for d, dom in sorted(self.device.domains.items())}

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()


def request(fdp: atheris.FuzzedDataProvider) -> bytes:
    kind = fdp.ConsumeIntInRange(0, 9)
    domain = pick(fdp, (1, 2, 3, fuzzutil.u32(fdp)))
    start = pick(fdp, ADDRS) if fdp.ConsumeIntInRange(0, 7) else fuzzutil.u64(fdp)
    size = pick(fdp, (PAGE, 2 * PAGE, 0x800, 0, (1 << 64) - start))
    end = (start + size - 1) % (1 << 64)
    if kind <= 3:
        return map_(domain, start, end, pick(fdp, ADDRS), pick(fdp, (3, 3, 1, 2, 0, 4, 8)))
    if kind <= 5:
        return unmap(domain, start, end, 0 if fdp.ConsumeIntInRange(0, 5) else 1)
    if kind == 6:
        return attach(domain, pick(fdp, ENDPOINTS))
    if kind == 7:
        return detach(domain, pick(fdp, ENDPOINTS))
    if kind == 8:
        return probe(pick(fdp, ENDPOINTS))
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))  # any type, any length


def chain(fdp: atheris.FuzzedDataProvider, body: bytes) -> list[tuple[bytes | None, int, bool]]:
    shape = fdp.ConsumeIntInRange(0, 9)
    if shape == 0 and len(body) > 4:  # readable part split in two descriptors
        cut = fdp.ConsumeIntInRange(1, len(body) - 1)
        return [(body[:cut], cut, False), (body[cut:], len(body) - cut, False), (b"", 4, True)]
    if shape == 1:
        body = body[:fdp.ConsumeIntInRange(0, len(body))]  # cut short
    if shape == 2:
        return [(None, len(body) or 1, False), (b"", 4, True)]  # outside guest RAM
    tail = pick(fdp, (4, 4, 4, 0, 3, 8, 516))
    parts = [(body, len(body), False)] if body else []
    if tail or not parts:
        parts.append((b"", tail or 4, True))
    return parts


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    poll_us = pick(fdp, (0.0, 50.0, 2000.0))
    with fuzzutil.nothing_left_behind("the request thread"):
        threaded, plain = Guest(True, poll_us), Guest(False, poll_us)
        compare(fdp, threaded, plain)


def compare(fdp: atheris.FuzzedDataProvider, threaded: Guest, plain: Guest) -> None:
    try:
        for _ in range(fdp.ConsumeIntInRange(1, 6)):
            batch = [chain(fdp, request(fdp)) for _ in range(fdp.ConsumeIntInRange(1, 6))]
            buffers = [(threaded.post(c), plain.post(c)) for c in batch]
            plain.serve(plain.driver._avail_idx)
            threaded.serve(threaded.driver._avail_idx)
            check(threaded.ring_error == plain.ring_error, "ring error on one side only")
            check(threaded.driver.take_used() == plain.driver.take_used(),
                  "used entries differ")
            for mine, theirs in buffers:
                for (a, size), (b, _) in zip(mine, theirs, strict=True):
                    check(threaded.driver.read(a, size) == plain.driver.read(b, size),
                          f"writable buffer differs: {batch}")
            with threaded.ring.lock:
                threaded.ring.service.drain()
                check(threaded.mappings() == plain.mappings(), "mappings differ")
        with threaded.ring.lock:
            threaded.ring.service.drain()
            check(threaded.device.requests.counts == plain.device.requests.counts,
                  f"request counts {threaded.device.requests.counts} != "
                  f"{plain.device.requests.counts}")
            check(threaded.device.requests.statuses == plain.device.requests.statuses,
                  "status counts differ")
    finally:
        threaded.close()


if __name__ == "__main__":
    fuzzutil.run(one_input)
