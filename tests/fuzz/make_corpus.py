"""Regenerate the seed corpora in tests/fuzz/corpus/<harness>/ (deterministic).

The control harness's raw mode takes QMP text as it is, so its seeds are literal sessions.
The other harnesses decode their input with atheris.FuzzedDataProvider into a scenario, so
their seeds are found by search: the shortest input whose scenario reaches a named state of
a valid exchange (QEMU's vhost-user start sequence with both queues running and a request
answered S_OK, a vfio-user DMA transfer that completes and raises MSI, a 4K-granule table
walk that translates, ...), among seeded random inputs and, with --candidates, the files of
a directory (a corpus a fuzzing run grew: walkable page tables are too rare in random
bytes, so the committed page-table seeds were picked from the corpus a 60 s run grew). Each seed
is checked to pass `one_input` strictly (no known bug on its path), and to be under 4 KiB.

    .venv/bin/python tests/fuzz/make_corpus.py [--candidates DIR] [harness ...]
"""

from __future__ import annotations

import contextlib
import importlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

import fuzzutil

CORPUS = fuzzutil.FUZZ_DIR / "corpus"
MAX_SEED = 4096


@contextlib.contextmanager
def patched(obj, name: str, wrapper):
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


def search(module, predicates: dict, candidates: list[Path] = (), size=(64, 900),
           tries: int = 20000, seed: int = 1):
    """{name: bytes}: for each predicate(stats) the shortest hit among the candidates, or
    else among the first few random inputs that hit it."""
    rng = random.Random(seed)
    found: dict[str, bytes] = {}
    files = sorted(p for d in candidates for p in d.iterdir() if p.stat().st_size < MAX_SEED)
    for i in range(len(files) + tries):
        if i < len(files):
            data = files[i].read_bytes()
        elif len(found) == len(predicates):
            break
        else:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(*size)))
        stats: Counter = Counter()
        with module.observe(stats):
            try:
                module.harness.one_input(data)
            except fuzzutil.PropertyViolation:
                continue
        for name, predicate in predicates.items():
            if predicate(stats) and (name not in found or len(data) < len(found[name])):
                found[name] = data
        if i >= len(files) and len(found) == len(predicates) and rng.random() < 0.02:
            break
    missing = set(predicates) - set(found)
    if missing:
        raise SystemExit(f"{module.harness.__name__}: no seed found for {sorted(missing)}")
    return found


# --- what each harness's seeds must reach --------------------------------------------------

class Virtqueue:
    harness = importlib.import_module("fuzz_virtqueue")

    @staticmethod
    @contextlib.contextmanager
    def observe(stats):
        from viommu.device.virtio_iommu import VirtioIommuDevice

        def count(handle):
            def wrapped(self, req):
                result = handle(self, req)
                stats[("status", req.type, None if result is None else result[0])] += 1
                return result
            return wrapped

        def model(push):
            def wrapped(self, record):
                outcome = push(self, record)
                stats[("event", outcome)] += 1
                return outcome
            return wrapped
        with patched(VirtioIommuDevice, "handle_request", count), \
                patched(Virtqueue.harness.RingModel, "push_event", model):
            yield

    predicates = {
        "attach-map-ok": lambda s: s[("status", 1, 0)] and s[("status", 3, 0)],
        "probe-ok": lambda s: s[("status", 5, 0)] > 0,
        "attach-table-invalidate": lambda s: s[("status", 6, 0)] and s[("status", 7, 0)],
        "event-delivered": lambda s: s[("event", ("ok", True))] > 0,
        "ring-error": lambda s: s[("event", ("ringerror", None))] > 0,
    }


class VhostUser:
    harness = importlib.import_module("fuzz_vhost_user")

    @staticmethod
    @contextlib.contextmanager
    def observe(stats):
        from viommu.backend.vhost_device import IommuVhostDevice
        from viommu.device.virtio_iommu import VirtioIommuDevice
        from viommu.events.relay import EventRelay

        def started(fn):
            def wrapped(self, index, *args):
                stats[("started", index)] += 1
                return fn(self, index, *args)
            return wrapped

        def handle(fn):
            def wrapped(self, req):
                result = fn(self, req)
                stats[("status", None if result is None else result[0])] += 1
                return result
            return wrapped

        def deliver(fn):
            def wrapped(self):
                delivered = fn(self)
                stats["delivered"] += delivered
                return delivered
            return wrapped
        with patched(IommuVhostDevice, "queue_started", started), \
                patched(VirtioIommuDevice, "handle_request", handle), \
                patched(EventRelay, "deliver", deliver):
            yield

    predicates = {
        "start-and-serve": lambda s: s[("started", 0)] and s[("started", 1)]
        and s[("status", 0)] >= 2,
        "event-delivered": lambda s: s["delivered"] > 0,
        "start-and-refuse": lambda s: s[("started", 0)] and s[("status", 4)] > 0,
    }


class VfioUser:
    harness = importlib.import_module("fuzz_vfio_user")

    @staticmethod
    @contextlib.contextmanager
    def observe(stats):
        from viommu.endpoints.dma_engine import DmaEngine

        def finish(fn):
            def wrapped(self, error, why):
                stats[("finish", error)] += 1
                return fn(self, error, why)
            return wrapped

        def irq(fn):
            def wrapped(self):
                stats["msi"] += 1
                return fn(self)
            return wrapped
        from viommu.endpoints.dma_engine import DmaEndpoint
        with patched(DmaEngine, "_finish", finish), patched(DmaEndpoint, "_raise_msi", irq):
            yield

    predicates = {
        "transfer-done": lambda s: s[("finish", 0)] > 0 and s["msi"] > 0,
        "transfer-fault": lambda s: s[("finish", 0x10)] > 0,
        "transfer-refused": lambda s: any(k[0] == "finish" and k[1] > 0x100 for k in s),
    }


class Pagetables:
    harness = importlib.import_module("fuzz_pagetables")

    @staticmethod
    @contextlib.contextmanager
    def observe(stats):
        from viommu.testing.reference_walk import ReferenceEngine

        def walk(fn):
            def wrapped(self, cd, iova, access):
                result = fn(self, cd, iova, access)
                stats[("walked", cd.granule[1 if iova >> 55 & 1 else 0])] += 1
                return result
            return wrapped

        def translate(fn):
            def wrapped(self, sid, ssid, iova, size, access):
                result = fn(self, sid, ssid, iova, size, access)
                mode = self.streams.get(sid, ("none",))[0]
                stats[("ok" if result[0] is not None else "fault", mode, ssid >= 0)] += 1
                return result
            return wrapped
        with patched(ReferenceEngine, "_walk_aarch64", walk), \
                patched(ReferenceEngine, "translate", translate):
            yield

    predicates = {
        "walk-4k": lambda s: s[("walked", 12)] and s[("ok", "table", False)],
        "walk-16k-64k": lambda s: s[("walked", 14)] and s[("walked", 16)],
        "substream": lambda s: s[("ok", "table", True)] > 0,
        "map-and-bypass": lambda s: s[("fault", "map", False)] and s[("ok", "bypass", False)],
    }


class Iommufd:
    harness = importlib.import_module("fuzz_iommufd")

    @staticmethod
    @contextlib.contextmanager
    def observe(stats):
        from viommu.events.page_requests import PageRequestRelay

        def take(fn):
            def wrapped(self, record):
                group = fn(self, record)
                if group is not None:
                    stats["groups"] += 1
                    stats["multi"] += len(group[1]) > 1
                return group
            return wrapped

        def complete(fn):
            def wrapped(self, requests, respond):
                stats[("policy", self.policy)] += 1
                return fn(self, requests, respond)
            return wrapped

        def account(fn):
            def wrapped(self, seq, itself):
                stats["lost-header" if itself else "vevent"] += 1
                return fn(self, seq, itself)
            return wrapped
        with patched(Iommufd.harness.FaultModel, "take", take), \
                patched(PageRequestRelay, "_group_complete", complete), \
                patched(Iommufd.harness.VeventModel, "account", account):
            yield

    predicates = {
        "fault-groups": lambda s: s["multi"] > 0 and s["groups"] >= 2,
        "fault-host-policy": lambda s: s[("policy", "host")] > 0,
        "fault-guest-policy": lambda s: s[("policy", "guest")] > 0,
        "vevent-stream": lambda s: s["vevent"] >= 3 and s["lost-header"] > 0,
    }


class BlkQueue:
    harness = importlib.import_module("fuzz_blk_queue")

    @staticmethod
    @contextlib.contextmanager
    def observe(stats):
        import blk_model

        def execute(fn):
            def wrapped(self):
                status = fn(self)
                stats[("status", status)] += 1
                return status
            return wrapped

        def serve(fn):
            def wrapped(self):
                n = fn(self)
                stats[("error", self.error)] += 1
                stats["faults"] += len(self.faults)
                return n
            return wrapped
        with patched(blk_model.Request, "execute", execute), \
                patched(blk_model.Model, "serve", serve):
            yield

    predicates = {
        "requests-ok": lambda s: s[("status", 0)] >= 2,
        "io-error-and-unsupported": lambda s: s[("status", 1)] and s[("status", 2)],
        "data-fault": lambda s: s["faults"] > 0 and s[("error", 0)] > 0,
        "ring-fault": lambda s: s[("error", 1)] > 0,
        "bad-indirect": lambda s: s[("error", 6)] > 0,
        "loop-or-bad-next": lambda s: s[("error", 5)] or s[("error", 4)],
        "readable-after-writable": lambda s: s[("error", 7)] > 0,
        "avail-ahead": lambda s: s[("error", 2)] > 0,
    }


SEARCHED = {"fuzz_virtqueue": Virtqueue, "fuzz_vhost_user": VhostUser,
            "fuzz_vfio_user": VfioUser, "fuzz_pagetables": Pagetables, "fuzz_iommufd": Iommufd,
            "fuzz_blk_queue": BlkQueue}


def qmp(*requests: dict, negotiate: bool = True) -> bytes:
    first = [{"execute": "qmp_capabilities"}] if negotiate else []
    return "\r\n".join(json.dumps(r) for r in [*first, *requests]).encode() + b"\r\n"


RAW = 0x06  # fuzz_control first byte: raw stream, one chunk, policy invalid
RAW_HOST = 0x0E  # raw stream, one chunk, policy host
CONTROL_SEEDS = {
    "queries": bytes([RAW]) + qmp(
        {"execute": "query-commands", "id": 1}, {"execute": "query-status", "id": 2},
        {"execute": "query-endpoints", "id": 3}, {"execute": "query-domains", "id": "x"},
        {"execute": "query-events", "arguments": {"limit": 5}, "id": 4},
        {"execute": "query-requests", "id": 5}),
    "inject-events": bytes([RAW]) + qmp(
        {"execute": "inject-event", "arguments": {"type": "C_BAD_STE", "sid": 256}, "id": 1},
        {"execute": "inject-event", "arguments": {"type": "F_TRANSLATION", "sid": 256,
                                                  "address": 65536, "access": "write",
                                                  "count": 3}, "id": 2},
        {"execute": "inject-event", "arguments": {"type": "0x0a", "sid": 512, "ssid": 1},
         "id": 3},
        {"execute": "inject-event", "arguments": {"type": "F_WALK_EABT", "sid": 256,
                                                  "fetch-addr": 4096, "class": "TT"}, "id": 4}),
    "memory-tables-stage2": bytes([RAW]) + qmp(
        {"execute": "memory-write", "arguments": {"gpa": 0x4000_0000, "data": "01" * 64},
         "id": 1},
        {"execute": "memory-read", "arguments": {"gpa": 0x4000_0000, "size": 64}, "id": 2},
        {"execute": "attach-table", "arguments": {"sid": 256, "ste0": 0x4000_000B,
                                                  "ste1": 0}, "id": 3},
        {"execute": "stage2-set", "arguments": {"ipa": 0x4000_0000, "size": 4096,
                                                "access": "ro"}, "id": 4},
        {"execute": "stage2-reset", "id": 5}, {"execute": "add-endpoint",
                                               "arguments": {"endpoint": 768}, "id": 6}),
    "page-requests-host": bytes([RAW_HOST]) + qmp(
        {"execute": "inject-page-request", "arguments": {"sid": 256, "address": 0x10000,
                                                         "grpid": 3, "pasid": 1}, "id": 1},
        {"execute": "query-page-requests", "id": 2},
        {"execute": "page-response", "arguments": {"id": 1, "code": "success"}, "id": 3},
        {"execute": "set-page-request-policy", "arguments": {"policy": "invalid"}, "id": 4},
        {"execute": "pasid-unbind", "arguments": {"sid": 256, "pasid": 1}, "id": 5}),
    "endpoints-and-errors": bytes([RAW]) + qmp(
        {"execute": "endpoint-create", "arguments": {"endpoint": 1024, "pri": True}, "id": 1},
        {"execute": "endpoint-delete", "arguments": {"endpoint": 1024}, "id": 2},
        {"execute": "no-such-command", "id": 3},
        {"execute": "inject-event", "arguments": {"type": "C_BAD_STE"}, "id": 4},
        {"execute": "query-status", "arguments": {"bogus": 1}, "id": 5}) + b"not json\r\n",
    "no-negotiation-split": bytes([0x00]) + qmp({"execute": "query-status"}, negotiate=False)
    + b'{"execute": "qmp_capabilities"} {"execute": "query-status", "id": [1, {"a": "}"}]}',
}


def write(harness: str, seeds: dict[str, bytes]) -> None:
    module = importlib.import_module(harness)
    target = CORPUS / harness
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():
        old.unlink()
    written: set[bytes] = set()
    for name, data in sorted(seeds.items()):
        if data in written:
            continue  # one input reached two of the states: keep one copy
        written.add(data)
        if len(data) >= MAX_SEED:
            raise SystemExit(f"{harness}/{name}: {len(data)} bytes, the limit is {MAX_SEED}")
        module.one_input(data)  # every seed passes the property
        (target / f"seed-{name}").write_bytes(data)
        print(f"{harness}/seed-{name}: {len(data)} bytes")


def main(argv: list[str]) -> None:
    candidates = []
    while argv[:1] == ["--candidates"]:
        candidates.append(Path(argv[1]))
        argv = argv[2:]
    wanted = argv or ["fuzz_control", *SEARCHED]
    for harness in wanted:
        if harness == "fuzz_control":
            write(harness, CONTROL_SEEDS)
        else:
            write(harness, search(SEARCHED[harness], SEARCHED[harness].predicates, candidates))


if __name__ == "__main__":
    import logging
    logging.disable(logging.CRITICAL)
    fuzzutil.set_strict(True)  # a seed must not lean on a waived (known) bug
    main(sys.argv[1:])
