"""Fuzz the vhost-user front-end surface: messages into a VhostUserConnection serving a real
Backend (the virtio-iommu device), over a socketpair, as tests/unit/test_vhost_user.py
drives it.

An input is a message stream: header (request, flags, size) + payload, each message with
0..3 fds from a pool created once (a memfd that is guest RAM, a small memfd, two eventfds;
SCM_RIGHTS gives the connection its own copies each run). Payloads come from templates of
the real messages with fuzzed fields (memory tables, ring addresses and sizes, config
accesses...) or are raw; `size` may disagree with the payload, desynchronising the stream.
The memfd guest RAM holds rings with fuzzer-built requests and event buffers, so once the
fuzzer starts the queues, kicks run the device's data path, and injected events its eventq.

The whole stream is written, then the write side is shut, so the connection can never block
waiting for bytes (a stall would show as a slow `on_readable`, which is checked).

Properties: nothing raises out of `on_readable` (nor out of a kick or an event flush);
every message that needs a reply (a reply body, or NEED_REPLY) gets exactly one, in order,
with flags 0x5 and a body of the right size; fds are never leaked: after each message the
fds from the pool that this process holds are exactly those the connection keeps (vring
kick/call/err fds, one per memory mapping), and once the connection is closed the process
has the same fds as before the input.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import atheris
import fuzzutil
from fuzzutil import check, interesting, pick

with fuzzutil.instrumented(__name__):
    from viommu.backend.backend import Backend
    from viommu.device.virtio_iommu import VirtioIommuDevice
    from viommu.transport.vhost_user import connection as vu
    from viommu.transport.vhost_user.messages import HEADER, MAX_PAYLOAD, Request

from fuzz_virtqueue import make_request

MEM_SIZE = 0x10000
GPA = 0x4000_0000
UADDR = 0x7F00_0000_0000
QSIZE = 16
RINGS = {0: (0x1000, 0x2000, 0x3000), 1: (0x4000, 0x5000, 0x6000)}  # desc, avail, used
DATA = 0x8000
ENDPOINTS = (256, 512)
REPLY_FLAGS = 0x5
FEATURES = VirtioIommuDevice.OFFERED_FEATURES | (1 << 30)  # Backend.features()
NEED_REPLY = 0x8
SLOW_CALL = 2.0  # seconds: an on_readable this slow is a stall
# The whole stream is written before it is served: it must fit the socketpair's buffer.
MAX_STREAM = 64 * 1024

# Bugs this harness found are fixed (tests/fuzz/regressions/fuzz_vhost_user/); none waived.
KNOWN_BUGS: dict[str, str] = {}


def pool() -> fuzzutil.FdPool:
    return fuzzutil.fd_pool("ram", MEM_SIZE)


def guest_image(fdp) -> bytes:
    """Guest RAM: requests on queue 0, event buffers on queue 1, published."""
    ram = bytearray(MEM_SIZE)
    data = DATA
    for q, count in ((0, fdp.ConsumeIntInRange(0, 6)), (1, fdp.ConsumeIntInRange(0, 4))):
        desc, avail, _ = RINGS[q]
        for n in range(count):
            if q == 0:
                rtype = fdp.ConsumeIntInRange(1, 8)
                readable = make_request(fdp, rtype)
                wlen = pick(fdp, [4, 4, 516, 3, fdp.ConsumeIntInRange(0, 600)])
            else:
                readable, wlen = b"", pick(fdp, [24, 32, 32, 8])
            segs = []
            for body, flags in ((readable, 0), (bytes(wlen), 2)):
                if body:
                    ram[data:data + len(body)] = body
                    segs.append((GPA + data, len(body), flags))
                    data += (len(body) + 15) & ~15
            head = 2 * n % QSIZE
            for i, (addr, length, flags) in enumerate(segs):
                more = 1 if i < len(segs) - 1 else 0
                struct.pack_into("<QIHH", ram, desc + 16 * (head + i), addr, length,
                                 flags | more, head + i + 1)
            struct.pack_into("<H", ram, avail + 4 + 2 * (n % QSIZE), head)
            struct.pack_into("<H", ram, avail + 2, n + 1)
    return bytes(ram)


# --- messages ------------------------------------------------------------------------------

def _u64(fdp, likely=()) -> bytes:
    return struct.pack("<Q", interesting(fdp, 64, likely))


def _state(fdp, likely_num=()) -> bytes:
    return struct.pack("<II", interesting(fdp, 32, (0, 1, 0, 1, 2, 255)),
                       interesting(fdp, 32, likely_num))


def _mem_table(fdp, p: fuzzutil.FdPool) -> tuple[bytes, list[int]]:
    n = pick(fdp, [1, 1, 1, 1, 0, 2, 8, 9])
    regions, fds = b"", []
    for _ in range(min(n, 9)):
        regions += struct.pack(
            "<QQQQ", interesting(fdp, 64, (GPA, GPA, 0, GPA + 0x8000)),
            interesting(fdp, 64, (MEM_SIZE, MEM_SIZE, 0x1000, 0, 1 << 63, (1 << 64) - 1)),
            interesting(fdp, 64, (UADDR, UADDR, UADDR + 0x8000)),
            interesting(fdp, 64, (0, 0, 0x1000, MEM_SIZE, 1 << 63)))
        fds.append(p.ram if fdp.ConsumeIntInRange(0, 5) else pick(fdp, p.fds))
    if not fdp.ConsumeIntInRange(0, 7):
        fds = fds[:fdp.ConsumeIntInRange(0, len(fds))]
    return struct.pack("<II", n, 0) + regions, fds


def _vring_addr(fdp) -> bytes:
    q = interesting(fdp, 32, (0, 1, 0, 1, 2))
    desc, avail, used = RINGS.get(q, RINGS[0])
    desc, avail, used = (UADDR + desc, UADDR + avail, UADDR + used)
    if not fdp.ConsumeIntInRange(0, 3):
        desc, avail, used = (interesting(fdp, 64, (desc, desc + 1, UADDR + MEM_SIZE - 8))
                             for _ in range(3))
    return struct.pack("<IIQQQQ", q, interesting(fdp, 32, (0,)), desc, used, avail, 0)


def _ring_fd(fdp, p: fuzzutil.FdPool) -> tuple[bytes, list[int]]:
    value = interesting(fdp, 64, (0, 1, 0, 1, 0x100, 0x101, 2))
    fds = [pick(fdp, p.events)] if fdp.ConsumeIntInRange(0, 7) else [
        pick(fdp, p.fds) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if value & 0x100 and fdp.ConsumeIntInRange(0, 3):
        fds = []
    return struct.pack("<Q", value), fds


def _config(fdp, write: bool) -> bytes:
    offset = interesting(fdp, 32, (0, 36, 40, 8))
    size = interesting(fdp, 32, (40, 4, 1, 256, 257, 0)) if not write else 0
    if write:
        data = fdp.ConsumeBytes(pick(fdp, [1, 4, 40, fdp.ConsumeIntInRange(0, 300)]))
        size = len(data) if fdp.ConsumeIntInRange(0, 7) else interesting(fdp, 32, (0, 256))
    else:
        data = bytes(min(size, 300))
        if not fdp.ConsumeIntInRange(0, 7):
            data = data[:fdp.ConsumeIntInRange(0, len(data))]
    return struct.pack("<III", offset, size, interesting(fdp, 32, (0,))) + data


def message(fdp, p: fuzzutil.FdPool, request: int) -> tuple[int, bytes, list[int]]:
    """(request, payload, fds) for one message of this kind, fields fuzzed."""
    fds: list[int] = []
    if request == Request.SET_FEATURES:
        payload = _u64(fdp, (FEATURES, FEATURES, VirtioIommuDevice.OFFERED_FEATURES, 0))
    elif request in (Request.SET_PROTOCOL_FEATURES, Request.SET_STATUS):
        payload = _u64(fdp, ((1 << 3) | (1 << 9), 0, 0xF))
    elif request == Request.SET_MEM_TABLE:
        payload, fds = _mem_table(fdp, p)
    elif request == Request.SET_VRING_NUM:
        payload = _state(fdp, (QSIZE, QSIZE, 0, 3, 32768, 65536))
    elif request in (Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_ENABLE):
        payload = _state(fdp, (0, 1, 0xFFFF))
    elif request == Request.SET_VRING_ADDR:
        payload = _vring_addr(fdp)
    elif request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        payload, fds = _ring_fd(fdp, p)
    elif request in (Request.GET_CONFIG, Request.SET_CONFIG):
        payload = _config(fdp, request == Request.SET_CONFIG)
    elif request in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
                     Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS, Request.RESET_DEVICE,
                     Request.SET_OWNER, Request.RESET_OWNER):
        payload = b""
    else:
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if not fdp.ConsumeIntInRange(0, 15):  # fds where none belong, or too many
        fds = fds + [pick(fdp, p.fds) for _ in range(fdp.ConsumeIntInRange(1, 3))]
    return request, payload, fds


STARTUP = [Request.SET_FEATURES, Request.SET_MEM_TABLE,
           *[r for _q in RINGS for r in (Request.SET_VRING_NUM, Request.SET_VRING_BASE,
                                         Request.SET_VRING_ADDR, Request.SET_VRING_KICK,
                                         Request.SET_VRING_CALL, Request.SET_VRING_ENABLE)]]
KNOWN_REQUESTS = sorted(Request)


def startup_message(fdp, p: fuzzutil.FdPool, request: int, q: int) -> tuple[int, bytes, list[int]]:
    """The message QEMU's vhost_dev_start sends, exactly (queue q)."""
    desc, avail, used = RINGS[q]
    if request == Request.SET_FEATURES:
        return request, struct.pack("<Q", FEATURES), []
    if request == Request.SET_MEM_TABLE:
        return request, struct.pack("<IIQQQQ", 1, 0, GPA, MEM_SIZE, UADDR, 0), [p.ram]
    if request == Request.SET_VRING_NUM:
        return request, struct.pack("<II", q, QSIZE), []
    if request == Request.SET_VRING_BASE:
        return request, struct.pack("<II", q, 0), []
    if request == Request.SET_VRING_ADDR:
        return request, struct.pack("<IIQQQQ", q, 0, UADDR + desc, UADDR + used,
                                    UADDR + avail, 0), []
    if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL):
        return request, struct.pack("<Q", q), [p.events[q if request == Request.SET_VRING_KICK
                                                       else 1 - q]]
    return request, struct.pack("<II", q, 1), []  # SET_VRING_ENABLE


def build_stream(fdp, p: fuzzutil.FdPool) -> list[tuple[int, int, bytes, int, list[int]]]:
    """[(request, flags, payload, size, fds)]."""
    out = []
    if fdp.ConsumeIntInRange(0, 3):
        for i, request in enumerate(STARTUP):
            if not fdp.ConsumeIntInRange(0, 15):
                continue  # left out
            if fdp.ConsumeIntInRange(0, 15):
                request, payload, fds = startup_message(fdp, p, request, i >= 8)
            else:
                request, payload, fds = message(fdp, p, request)
            out.append((request, 0x1 | (NEED_REPLY if fdp.ConsumeIntInRange(0, 3) == 0 else 0),
                        payload, len(payload), fds))
    for _ in range(fdp.ConsumeIntInRange(0, 24)):
        if fdp.remaining_bytes() == 0:
            break
        kind = fdp.ConsumeIntInRange(0, 15)
        request = pick(fdp, KNOWN_REQUESTS) if kind else interesting(fdp, 32, (0, 44, 100))
        request, payload, fds = message(fdp, p, request)
        flags = pick(fdp, [0x1, 0x1, 0x1, 0x9, 0x9, 0x5, 0x0, fuzzutil.u32(fdp)])
        size = len(payload)
        if not fdp.ConsumeIntInRange(0, 31):  # a size that lies
            size = interesting(fdp, 32, (len(payload) + 1, max(len(payload) - 1, 0),
                                         MAX_PAYLOAD, MAX_PAYLOAD + 1))
        out.append((request, flags, payload, size, fds))
        if sum(len(m[2]) + 64 for m in out) > MAX_STREAM:
            break
    return out


# --- the property ----------------------------------------------------------------------------

class Harness:
    def __init__(self, fdp, p: fuzzutil.FdPool, baseline: set[int]) -> None:
        self.fdp, self.p, self.baseline = fdp, p, baseline
        self.backend = Backend("/nonexistent/vu.sock", None, ENDPOINTS)
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.readers: dict[int, object] = {}
        self.conn = vu.VhostUserConnection(theirs, self.backend.vhost, self)
        self.backend.listener.connection = self.conn
        self.expected_replies: list[int] = []
        real_dispatch = self.conn._dispatch

        def dispatch(msg) -> None:
            fds = list(msg.fds)
            if msg.request in vu._HAS_REPLY_BODY or msg.need_reply:
                self.expected_replies.append(msg.request)
            real_dispatch(msg)  # an exception here escapes on_readable: the property fails
            self.check_fds(msg, fds)
        self.conn._dispatch = dispatch
        fuzzutil.check_failed_reads_close_fds(self.conn, self.held, (OSError, vu.ProtocolError))

    def held(self) -> set[int]:
        """Copies of pool fds this input made this process hold."""
        return self.p.held() - self.baseline

    def kept(self) -> set[int]:
        return {fd for v in self.conn.vrings for fd in (v.kick_fd, v.call_fd, v.err_fd)
                if fd is not None}

    def check_fds(self, msg, fds: list[int]) -> None:
        held = self.held()
        expected = len(self.kept()) + len(self.conn._mappings)
        if len(held) == expected:
            return
        raise fuzzutil.PropertyViolation(
            f"after {msg.name} (fds {fds}) this process holds {len(held)} copies of pool "
            f"fds {sorted(held)}; the connection keeps {sorted(self.kept())} and "
            f"{len(self.conn._mappings)} mappings")

    def send_all(self, stream) -> None:
        for request, flags, payload, size, fds in stream:
            data = HEADER.pack(request, flags, size) + payload
            fuzzutil.send_message(self.sock, data, fds)
        self.sock.shutdown(socket.SHUT_WR)

    def serve(self) -> None:
        for _ in range(200):
            if self.conn.closed:
                return
            start = time.monotonic()
            self.conn.on_readable()
            took = time.monotonic() - start
            check(took < SLOW_CALL, f"on_readable took {took:.1f} s: a stall")
            self.between_messages()
        raise fuzzutil.PropertyViolation("the connection never reached the end of the stream")

    def between_messages(self) -> None:
        """What the event loop may do between two messages: a kick, an event to deliver."""
        fdp = self.fdp
        if fdp.remaining_bytes() == 0:
            return
        what = fdp.ConsumeIntInRange(0, 7)
        if what == 0:
            for callback in list(self.readers.values()):
                callback()
        elif what == 1:
            result = self.backend.control.call("inject-event", {
                "type": pick(fdp, ["F_TRANSLATION", "C_BAD_STE", "F_STREAM_DISABLED"]),
                "sid": pick(fdp, ENDPOINTS), "count": fdp.ConsumeIntInRange(1, 4)})
            check(result["count"] == result["delivered"] + result["pending"] + result["lost"]
                  + result["not_forwarded"], f"inject-event accounting {result}")

    # The connection watches kick fds through the harness, as it would through the loop.

    def add_reader(self, fd: int, callback) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def check_replies(self) -> None:
        self.sock.setblocking(False)
        data = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, ConnectionResetError):  # reset: it closed with unread
                break                                          # bytes, after our replies
            if not chunk:
                break
            data += chunk
        replies = []
        while data:
            check(len(data) >= HEADER.size, f"reply stream ends in a header: {data.hex()}")
            request, flags, size = HEADER.unpack_from(data)
            body = data[HEADER.size:HEADER.size + size]
            check(len(body) == size, f"reply {request} announces {size} bytes, has {len(body)}")
            check(flags == REPLY_FLAGS, f"reply to {request} has flags {flags:#x}, not 0x5")
            check(size == 8 or request == Request.GET_CONFIG and size >= 12,
                  f"reply to {request} has a {size}-byte body")
            replies.append(request)
            data = data[HEADER.size + size:]
        check(replies == self.expected_replies,
              f"replies {replies} != expected {self.expected_replies}")

    def close(self) -> None:
        self.conn.close()
        self.sock.close()


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    p = pool()
    p.reset(guest_image(fdp))
    stream = build_stream(fdp, p)
    before = fuzzutil.open_fds()
    h = Harness(fdp, p, p.held())
    try:
        h.send_all(stream)
        h.serve()
        h.check_replies()
    finally:
        h.close()
        leftovers = h.held()
        for fd in leftovers:  # whatever happened, the next input starts clean
            os.close(fd)
    check(not leftovers, f"pool fds still open after the connection closed: {leftovers}")
    leaked = fuzzutil.leaked_fds(before)
    check(not leaked, f"fds open after the connection closed: {leaked}")


if __name__ == "__main__":
    fuzzutil.run(one_input)
