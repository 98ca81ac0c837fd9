"""Fuzz the iommufd host edge (viommu.transport.iommufd): byte streams into FaultQueue
(IO page fault groups) and VeventQueue (SMMUv3 vEVENTQ), over SOCK_STREAM socketpairs, as
tests/unit/test_iommufd.py feeds them; each queue either bare or attached to a real Backend
(`attach_iommufd`, page request policy invalid/host/guest).

The peer writes the stream in fuzzer-chosen chunks (structured records with edge values, or
raw bytes; partial records across writes), `on_readable` runs after each chunk, then the
peer shuts its write side (EOF) and `on_readable` runs once more.

Fault fd properties: nothing raises out of on_readable; the groups handed out (and those
answered INVALID at once) are exactly those a plain model of the fault fd semantics in the
module docstring predicts (records grouped by cookie up to LAST_PAGE, a record reusing a
pending cookie dropped, groups with no endpoint or fields PRI cannot hold rejected, a stream
ending mid-group discarded); every group handed out is answerable exactly once (respond
works, a second respond is UnknownCookie, RESPONSE_FAILURE writes INVALID and raises
PriMustBeDisabled), and the response records on the wire are exactly the expected ones.
With a Backend: every group but stop markers is answered exactly once, through whichever
policy, once the controller answers what waits for it; the relay's counters add up.

vEVENTQ properties: nothing raises out of on_readable; received events, losses (sequence
gaps, LOST_EVENTS headers), gaps and errors are exactly what the module docstring's rules
give; every event reaches the callback; with a Backend, each one reaches the relay and each
loss is counted upstream.
"""

from __future__ import annotations

import socket
import struct

import atheris
import fuzzutil
from fuzzutil import check, interesting, pick

with fuzzutil.instrumented(__name__):
    from viommu.backend.backend import Backend, BackendOptions
    from viommu.events.page_requests import PASID_BITS, POLICIES, PRG_INDEX_BITS, ResponseCode
    from viommu.events.smmuv3 import EventRecord
    from viommu.transport import iommufd as fd_mod
    from viommu.transport.iommufd import (
        HWPT_PGFAULT,
        IOMMU_PGFAULT_FLAGS_LAST_PAGE,
        IOMMU_PGFAULT_FLAGS_PASID_VALID,
        VEVENT_HEADER,
        FaultQueue,
        HwptPgfault,
        PriMustBeDisabled,
        UnknownCookie,
        VeventHeader,
        VeventQueue,
    )

DEV_TO_SID = {7: 256, 8: 512}
INT_MAX = 0x7FFF_FFFF
REC = HWPT_PGFAULT.size  # 40


class NoLoop:
    """The harness reads the queues itself: nothing watches their fds."""

    def add_reader(self, fd: int, callback) -> None:
        pass

    def remove_reader(self, fd: int) -> bool:
        return False


NO_LOOP = NoLoop()
VREC = VEVENT_HEADER.size + 32
CODES = {ResponseCode.SUCCESS: 0, ResponseCode.INVALID_REQUEST: 1,
         ResponseCode.RESPONSE_FAILURE: 1}


def chunks(fdp, stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(stream):
        n = pick(fdp, [len(stream), REC, VREC, 8, 1, 3, 39, 41, fdp.ConsumeIntInRange(1, 200)])
        out.append(stream[pos:pos + n])
        pos += n
    return out


def read_responses(peer: socket.socket) -> list[tuple[int, int]]:
    data = b""
    while True:
        try:
            chunk = peer.recv(65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    check(len(data) % 8 == 0, f"{len(data)} response bytes: not whole records")
    return [struct.unpack_from("<II", data, i) for i in range(0, len(data), 8)]


# --- fault fd --------------------------------------------------------------------------------

def fault_stream(fdp) -> bytes:
    out = b""
    cookies = [interesting(fdp, 32, (1, 2, 3)) for _ in range(3)]
    for _ in range(fdp.ConsumeIntInRange(0, 12)):
        if fdp.ConsumeIntInRange(0, 15) == 0:
            out += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 60))
            continue
        flags = interesting(fdp, 32, (2, 2, 3, 0, 1))
        out += HwptPgfault(
            flags, interesting(fdp, 32, (7, 7, 8, 9)),
            interesting(fdp, 32, (0, 1, (1 << PASID_BITS) - 1, 1 << PASID_BITS)),
            interesting(fdp, 32, (0, 3, (1 << PRG_INDEX_BITS) - 1, 1 << PRG_INDEX_BITS)),
            interesting(fdp, 32, (1, 2, 3, 0, 4, 8, 0xF)),
            interesting(fdp, 64, (0x10000, 0x12345, 0, (1 << 64) - 1)),
            interesting(fdp, 32, (0,)), pick(fdp, cookies)).encode()
    return out


class FaultModel:
    """The fault fd semantics of viommu.transport.iommufd's docstring, over whole records."""

    def __init__(self) -> None:
        self.partial: dict[int, list[HwptPgfault]] = {}
        self.pending: set[int] = set()
        self.shut = False
        self.responses: list[tuple[int, int]] = []  # expected on the wire, in order
        self.backend_answered: list[int] = []  # cookies answered by the backend itself

    def take(self, record: HwptPgfault):
        """A group to hand out, or None."""
        if record.cookie in self.pending:
            return None
        self.partial.setdefault(record.cookie, []).append(record)
        if not record.flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE:
            return None
        records = self.partial.pop(record.cookie)
        valid = (not self.shut and records[-1].dev_id in DEV_TO_SID and all(
            r.grpid < 1 << PRG_INDEX_BITS and (not r.flags & IOMMU_PGFAULT_FLAGS_PASID_VALID
                                               or r.pasid < 1 << PASID_BITS)
            for r in records))
        if not valid:
            self.responses.append((record.cookie, 1))
            return None
        self.pending.add(record.cookie)
        return record.cookie, tuple(records)


def fault_property(fdp, with_backend: bool) -> None:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.setblocking(False)
    backend = None
    try:
        if with_backend:
            backend = Backend("/nonexistent/vu.sock", None, sorted(DEV_TO_SID.values()),
                              options=BackendOptions(page_request_policy=pick(fdp, POLICIES)))
            backend.relay.extended = backend.page_requests.guest_can_answer = fdp.ConsumeBool()
            [queue] = backend.attach_iommufd(ours.fileno(), None, DEV_TO_SID, NO_LOOP)
        else:
            queue = FaultQueue(ours.fileno(), DEV_TO_SID)
        model = FaultModel()
        stream = fault_stream(fdp)
        delivered: list[tuple[int, tuple]] = []
        fed = 0
        pieces = chunks(fdp, stream)
        for i, piece in enumerate(pieces):
            peer.sendall(piece)
            if i == len(pieces) - 1:
                peer.shutdown(socket.SHUT_WR)
            groups = queue.on_readable()
            whole = (fed + len(piece)) // REC - fed // REC
            start = fed // REC * REC
            fed += len(piece)
            expected = [g for k in range(whole) if (g := model.take(HwptPgfault.decode(
                stream[start + k * REC:start + (k + 1) * REC]))) is not None]
            got = [(g.cookie, g.records) for g in groups]
            check(got == expected, f"groups {got} != model {expected}")
            delivered += got
            if with_backend:
                sync_with_backend(queue, model)
            if not with_backend and fdp.ConsumeIntInRange(0, 3) == 0:
                answer(fdp, queue, model, [c for c, _ in got])
            if not with_backend and fdp.ConsumeIntInRange(0, 15) == 0:
                queue.close()
                model.responses += [(c, 1) for c in sorted(model.pending)]
                model.pending.clear()
                model.shut = True
        if queue.on_readable() or not pieces:  # at EOF: nothing more comes out
            check(not queue.on_readable(), "groups after EOF")
        model.partial.clear()  # the stream ended: incomplete groups are dropped
        if backend is None:
            answer(fdp, queue, model, sorted(model.pending))
            wire = read_responses(peer)
            check(wire == model.responses, f"responses on the wire {wire} != {model.responses}")
        else:
            backend_answers(fdp, backend, queue, model, delivered)
            wire = read_responses(peer)
            once = sorted([c for c, _ in model.responses] + model.backend_answered)
            check(sorted(c for c, _ in wire) == once and all(code in (0, 1) for _, code in wire),
                  f"responses on the wire {wire}: each answered group once ({once})")
        check(queue.pending() == sorted(model.pending),
              f"pending {queue.pending()} != {sorted(model.pending)}")
    finally:
        ours.close()
        peer.close()


def answer(fdp, queue: FaultQueue, model: FaultModel, cookies: list[int]) -> None:
    for cookie in cookies:
        if cookie not in model.pending:
            continue
        code = pick(fdp, list(ResponseCode))
        try:
            queue.respond(cookie, code)
            check(code != ResponseCode.RESPONSE_FAILURE, "RESPONSE_FAILURE did not raise")
        except PriMustBeDisabled:
            check(code == ResponseCode.RESPONSE_FAILURE, f"PriMustBeDisabled for {code!r}")
        model.pending.discard(cookie)
        model.responses.append((cookie, CODES[code]))
        try:
            queue.respond(cookie, code)
        except UnknownCookie:
            pass
        else:
            raise fuzzutil.PropertyViolation(f"group {cookie} answered twice")


def sync_with_backend(queue: FaultQueue, model: FaultModel) -> None:
    """The backend answers groups by itself (policy invalid at once; others when answered):
    what left the queue's pending set was answered by it, and nothing else may be pending."""
    pending = set(queue.pending())
    check(pending <= model.pending, f"pending {sorted(pending - model.pending)} unexpected")
    model.backend_answered += sorted(model.pending - pending)
    model.pending = pending


def backend_answers(fdp, backend: Backend, queue: FaultQueue, model: FaultModel,
                    delivered: list[tuple[int, tuple]]) -> None:
    """Answer what waits for the controller (or reset the device, which drains it); then
    exactly the stop markers are left pending: PRI gives them no response."""
    pr = backend.page_requests
    if fdp.ConsumeBool():
        for group_id in list(pr.pending):
            if group_id in pr.pending:
                pr.respond(group_id, pick(fdp, list(ResponseCode)), "fuzz controller")
    else:
        backend.vhost.reset("fuzz: device reset")
    sync_with_backend(queue, model)
    stop_markers = {cookie for cookie, records in delivered
                    if not records[-1].perm & (fd_mod.IOMMU_PGFAULT_PERM_READ
                                               | fd_mod.IOMMU_PGFAULT_PERM_WRITE)}
    check(model.pending <= stop_markers,
          f"groups {sorted(model.pending - stop_markers)} never answered by the backend")
    check(not pr.pending, f"page request groups still waiting: {list(pr.pending)}")
    relay = backend.relay
    check(relay.injected == relay.delivered + relay.pending + relay.lost
          + relay.not_forwarded + relay.drained, f"relay counters {relay.counters()}")


# --- vEVENTQ ---------------------------------------------------------------------------------

def vevent_stream(fdp) -> bytes:
    out = b""
    seq = interesting(fdp, 31, (0, 0, INT_MAX, INT_MAX - 1, 5))
    for _ in range(fdp.ConsumeIntInRange(0, 10)):
        kind = fdp.ConsumeIntInRange(0, 15)
        if kind == 0:
            out += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 50))
            continue
        step = pick(fdp, [1, 1, 1, 1, 2, 4, 0, -1, INT_MAX, 1 << 30])
        seq = (seq + step) & INT_MAX if kind != 1 else interesting(fdp, 32, (1 << 31, INT_MAX))
        flags = pick(fdp, [0, 0, 0, 1, 2, 3])
        out += VeventHeader(flags, seq).encode()
        if not flags & 1:
            out += fdp.ConsumeBytes(32).ljust(32, b"\0")
    return out


class VeventModel:
    """The vEVENTQ rules of viommu.transport.iommufd's docstring (VeventQueue's contract)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.expected = 0
        self.received = self.lost = self.gaps = self.lost_headers = self.errors = 0

    def account(self, seq: int, itself: int) -> None:
        gap = (seq - self.expected) & INT_MAX
        if gap > INT_MAX // 2:
            self.errors += 1
            gap = 0
        self.expected = (seq + 1) & INT_MAX
        self.gaps += 1 if gap else 0
        self.lost += gap + itself

    def feed(self, data: bytes, eof: bool) -> int:
        self.buffer += data
        events = 0
        while len(self.buffer) >= 8:
            flags, seq = struct.unpack_from("<II", self.buffer)
            if flags & ~1 or seq > INT_MAX:
                self.errors += 1
                self.buffer = b""
                break
            if flags & 1:
                self.buffer = self.buffer[8:]
                self.lost_headers += 1
                self.account(seq, 1)
                continue
            if len(self.buffer) < VREC:
                break
            self.buffer = self.buffer[VREC:]
            self.account(seq, 0)
            self.received += 1
            events += 1
        if eof and self.buffer:
            self.errors += 1
            self.buffer = b""
        return events

    def counters(self) -> dict:
        return {"received": self.received, "lost": self.lost, "gaps": self.gaps,
                "lost_headers": self.lost_headers, "errors": self.errors}


def vevent_property(fdp, with_backend: bool) -> None:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    events: list[EventRecord] = []
    losses: list[int] = []
    backend = None
    try:
        if with_backend:
            backend = Backend("/nonexistent/vu.sock", None, sorted(DEV_TO_SID.values()))
            [queue] = backend.attach_iommufd(None, ours.fileno(), DEV_TO_SID, NO_LOOP)
            real_event, real_lost = queue.on_event, queue.on_lost
            queue.on_event = lambda e: (events.append(e), real_event(e))
            queue.on_lost = lambda n: (losses.append(n), real_lost(n))
        else:
            queue = VeventQueue(ours.fileno(), events.append, losses.append)
        model = VeventModel()
        stream = vevent_stream(fdp)
        pieces = chunks(fdp, stream)
        for piece in pieces:
            peer.sendall(piece)
            got = queue.on_readable()
            want = model.feed(piece, eof=False)
            check(len(got) == want, f"{len(got)} events from a read, model {want}")
        peer.shutdown(socket.SHUT_WR)
        check(not queue.on_readable(), "events from the read that saw EOF")  # read() == b""
        model.feed(b"", eof=True)
        check(queue.counters() == model.counters(),
              f"counters {queue.counters()} != model {model.counters()}")
        check(len(events) == queue.received, f"{len(events)} callbacks, {queue.received} "
                                             f"received")
        check(sum(losses) == queue.lost, f"on_lost total {sum(losses)} != lost {queue.lost}")
        if backend is not None:
            relay = backend.relay
            check(relay.injected == len(events), f"relay saw {relay.injected} of {len(events)}")
            check(relay.upstream_lost == queue.lost, f"upstream_lost {relay.upstream_lost}")
            check(relay.injected == relay.delivered + relay.pending + relay.lost
                  + relay.not_forwarded + relay.drained, f"relay counters {relay.counters()}")
    finally:
        ours.close()
        peer.close()


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode < 2:
        fault_property(fdp, with_backend=mode == 1)
    else:
        vevent_property(fdp, with_backend=mode == 3)


if __name__ == "__main__":
    fuzzutil.run(one_input)
