"""Fuzz the vfio-user client surface: messages into a VfioUserConnection serving the DMA
endpoint device (viommu.endpoints.dma_engine.DmaEndpoint), over a socketpair, as
tests/unit/test_vfio_user.py drives it.

An input is a message stream: header (id, command, size, flags, error) + payload, each with
0..3 fds from a pool created once (a memfd that is the client's memory, a small memfd, two
eventfds). Payloads come from templates of the real requests with fuzzed fields (VERSION
capabilities JSON, DMA_MAP/UNMAP, region and IRQ info, SET_IRQS, config and BAR0 accesses
that enable bus mastering and MSI and ring the DMA doorbell, REGION_WRITE_MULTI) or are raw;
the size may lie. The whole stream is written, then the write side is shut, so the
connection can never block waiting for bytes.

Properties: nothing raises out of `on_readable`; every request (type 0, without NO_REPLY)
gets exactly one reply and nothing else does; replies are in order, echo id and command,
have type REPLY, and an error reply is a bare header with a non-zero errno; the engine's
STATUS stays one of its four values; no call stalls; after each message the pool fds this
process holds are exactly those the connection keeps (IRQ eventfds, one per DMA mapping),
and after close the process has the fds it had before the input.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import atheris
import fuzzutil
from fuzzutil import check, interesting, pick

with fuzzutil.instrumented(__name__):
    from viommu.endpoints import dma_engine as ep
    from viommu.endpoints.dma_engine import DmaEndpoint
    from viommu.transport.vfio_user import connection as vc
    from viommu.transport.vfio_user import messages as m
    from viommu.transport.vfio_user.messages import Command, PciIrq, PciRegion

MEM_SIZE = 0x10000
GPA = 0x10_0000
SLOW_CALL = 2.0
# The whole stream is written before it is served: it must fit the socketpair's buffer.
MAX_STREAM = 64 * 1024
RW = m.VFIO_DMA_MAP_FLAG_READ | m.VFIO_DMA_MAP_FLAG_WRITE
MSI_TRIGGER = m.VFIO_IRQ_SET_DATA_EVENTFD | m.VFIO_IRQ_SET_ACTION_TRIGGER
QEMU_CAPS = {"capabilities": {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
                              "max_msg_fds": 16, "max_data_xfer_size": 1048576,
                              "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": True}}

MSI_OFFSET = DmaEndpoint().config.msi_offset

# Bugs this harness found are fixed (tests/fuzz/regressions/fuzz_vfio_user/); none waived.
KNOWN_BUGS: dict[str, str] = {}


# What the DMA memfd holds before each input.
RAM_IMAGE = bytes(range(256)) * (MEM_SIZE // 256)


def pool() -> fuzzutil.FdPool:
    return fuzzutil.fd_pool("dma", MEM_SIZE)


# --- messages ------------------------------------------------------------------------------

def _version(fdp) -> bytes:
    choice = fdp.ConsumeIntInRange(0, 7)
    if choice <= 2:
        text = json.dumps(QEMU_CAPS).encode() + b"\0"
    elif choice == 3:
        text = b""
    elif choice == 4:
        caps = {k: interesting(fdp, 64, (0, 1, 4096, 16)) for k in
                ("max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps")
                if fdp.ConsumeBool()}
        text = json.dumps({"capabilities": caps}).encode() + (b"\0" if fdp.ConsumeBool() else b"")
    else:
        text = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 120))
    return struct.pack("<HH", interesting(fdp, 16, (0, 0, 0, 1)),
                       interesting(fdp, 16, (0, 0, 1))) + text


def _dma_map(fdp, p: fuzzutil.FdPool) -> tuple[bytes, list[int]]:
    payload = m.DmaMap(interesting(fdp, 32, (32,)), interesting(fdp, 32, (RW, RW, 1, 2, 0, 4)),
                       interesting(fdp, 64, (0, 0, 0x1000, MEM_SIZE, 1 << 63)),
                       interesting(fdp, 64, (GPA, GPA, 0, GPA + 0x8000, (1 << 64) - 0x1000)),
                       interesting(fdp, 64, (MEM_SIZE, MEM_SIZE, 0x1000, 0, 1 << 63))).pack()
    if fdp.ConsumeIntInRange(0, 7) == 0:
        payload = payload[:fdp.ConsumeIntInRange(0, len(payload))]
    choice = fdp.ConsumeIntInRange(0, 7)
    fds = ([p.ram] if choice <= 4 else [] if choice == 5 else
           [pick(fdp, p.fds) for _ in range(fdp.ConsumeIntInRange(1, 3))])
    return payload, fds


def _dma_unmap(fdp) -> bytes:
    flags = interesting(fdp, 32, (0, 0, 0, m.VFIO_DMA_UNMAP_FLAG_ALL, 1))
    return m.DmaUnmap(interesting(fdp, 32, (24,)), flags,
                      interesting(fdp, 64, (GPA, 0, GPA + 0x1000)),
                      interesting(fdp, 64, (MEM_SIZE, 0, 0x1000))).pack()


def _set_irqs(fdp, p: fuzzutil.FdPool) -> tuple[bytes, list[int]]:
    flags = interesting(fdp, 32, (MSI_TRIGGER, MSI_TRIGGER, m.VFIO_IRQ_SET_DATA_NONE
                                  | m.VFIO_IRQ_SET_ACTION_TRIGGER, m.VFIO_IRQ_SET_DATA_BOOL
                                  | m.VFIO_IRQ_SET_ACTION_TRIGGER, m.VFIO_IRQ_SET_DATA_EVENTFD
                                  | m.VFIO_IRQ_SET_ACTION_MASK))
    count = interesting(fdp, 32, (1, 1, 0, 2))
    data = fdp.ConsumeBytes(count if count < 8 else 2)
    payload = m.IrqSet(interesting(fdp, 32, (20,)), flags,
                       interesting(fdp, 32, (PciIrq.MSI, PciIrq.MSI, PciIrq.ERR, PciIrq.INTX, 5)),
                       interesting(fdp, 32, (0, 0, 1)), count, data).pack()
    fds = ([pick(fdp, p.events)] if flags & m.VFIO_IRQ_SET_DATA_EVENTFD
           and fdp.ConsumeIntInRange(0, 3) else [])
    return payload, fds


def _access(fdp, write: bool) -> bytes:
    region = interesting(fdp, 32, (PciRegion.BAR0, PciRegion.BAR0, PciRegion.CONFIG, 8, 9))
    offset = interesting(fdp, 64, (0, ep.REG_SRC, ep.REG_DOORBELL, ep.REG_STATUS, 0x04,
                                   0xFFC, 0x1000))
    count = interesting(fdp, 32, (4, 4, 8, 1, 2, 0x40, 0, 1 << 20))
    data = b""
    if write:
        data = fdp.ConsumeBytes(min(count, 64)).ljust(min(count, 64), b"\0")
        if count > 64 and fdp.ConsumeBool():
            data = bytes(min(count, 1 << 13))
    return m.RegionAccess(offset, region, count, data).pack()


def _write_multi(fdp) -> bytes:
    writes = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        count = interesting(fdp, 32, (4, 8, 1, 9))
        writes.append(m.RegionAccess(interesting(fdp, 64, (ep.REG_SRC, ep.REG_DOORBELL, 0x04)),
                                     interesting(fdp, 32, (0, 7)), count,
                                     fdp.ConsumeBytes(8).ljust(8, b"\0")))
    payload = m.pack_write_multi(writes)
    if not fdp.ConsumeIntInRange(0, 7):
        payload = struct.pack("<Q", interesting(fdp, 64, (len(writes) + 1, 201))) + payload[8:]
    return payload


def request(fdp, p: fuzzutil.FdPool, command: int) -> tuple[bytes, list[int]]:
    fds: list[int] = []
    if command == Command.VERSION:
        payload = _version(fdp)
    elif command == Command.DMA_MAP:
        payload, fds = _dma_map(fdp, p)
    elif command == Command.DMA_UNMAP:
        payload = _dma_unmap(fdp)
    elif command == Command.DEVICE_GET_INFO:
        payload = m.DeviceInfo(interesting(fdp, 32, (16, 8)), 0, 0, 0).pack()
    elif command == Command.DEVICE_GET_REGION_INFO:
        payload = m.RegionInfo(interesting(fdp, 32, (32, 16)), 0, interesting(fdp, 32, range(10)),
                               0, 0, 0).pack()
    elif command == Command.DEVICE_GET_IRQ_INFO:
        payload = m.IrqInfo(interesting(fdp, 32, (16, 8)), 0, interesting(fdp, 32, range(6)),
                            0).pack()
    elif command == Command.DEVICE_SET_IRQS:
        payload, fds = _set_irqs(fdp, p)
    elif command in (Command.REGION_READ, Command.REGION_WRITE):
        payload = _access(fdp, command == Command.REGION_WRITE)
    elif command == Command.REGION_WRITE_MULTI:
        payload = _write_multi(fdp)
    elif command == Command.DEVICE_RESET:
        payload = b""
    else:
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if not fdp.ConsumeIntInRange(0, 15):
        fds = fds + [pick(fdp, p.fds) for _ in range(fdp.ConsumeIntInRange(1, 3))]
    return payload, fds


def script(fdp, p: fuzzutil.FdPool) -> list[tuple[int, bytes, list[int], int]]:
    """What QEMU and a guest driver do: version, map RAM, MSI, bus master, a transfer."""
    msi = MSI_OFFSET
    src, dst = GPA + interesting(fdp, 16, (0, 0x1000)), GPA + interesting(fdp, 16, (0x8000,))
    length = interesting(fdp, 32, (0x100, 0x1000, 0x9000, 0))
    return [
        (Command.VERSION, struct.pack("<HH", 0, 0) + json.dumps(QEMU_CAPS).encode() + b"\0",
         [], 0),
        (Command.DMA_MAP, m.DmaMap(32, RW, 0, GPA, MEM_SIZE).pack(), [p.ram], 0),
        (Command.DEVICE_SET_IRQS, m.IrqSet(20, MSI_TRIGGER, PciIrq.MSI, 0, 1).pack(),
         [p.events[0]], 0),
        (Command.REGION_WRITE, m.RegionAccess(0x04, PciRegion.CONFIG, 2, b"\x06\x00").pack(),
         [], 0),
        (Command.REGION_WRITE, m.RegionAccess(msi + 2, PciRegion.CONFIG, 2, b"\x81\x00").pack(),
         [], 0),
        (Command.REGION_WRITE, m.RegionAccess(ep.REG_SRC, PciRegion.BAR0, 24, struct.pack(
            "<QQII", src, dst, length, interesting(fdp, 32, (0, 0, 1 << 31 | 5)))).pack(),
         [], m.VFIO_USER_NO_REPLY),
        (Command.REGION_WRITE, m.RegionAccess(ep.REG_DOORBELL, PciRegion.BAR0, 4,
                                              struct.pack("<I", 1)).pack(),
         [], m.VFIO_USER_NO_REPLY),
        (Command.REGION_READ, m.RegionAccess(ep.REG_STATUS, PciRegion.BAR0, 8).pack(), [], 0),
    ]


def build_stream(fdp, p: fuzzutil.FdPool) -> list[tuple[int, int, bytes, int, list[int]]]:
    """[(command, flags, payload, size, fds)]."""
    out = []
    if fdp.ConsumeIntInRange(0, 3):
        for command, payload, fds, flags in script(fdp, p):
            if not fdp.ConsumeIntInRange(0, 15):
                continue
            if not fdp.ConsumeIntInRange(0, 15):
                payload, fds = request(fdp, p, command)
            out.append((command, flags, payload, m.HEADER.size + len(payload), fds))
    commands = sorted(Command)
    for _ in range(fdp.ConsumeIntInRange(0, 24)):
        if fdp.remaining_bytes() == 0:
            break
        command = pick(fdp, commands) if fdp.ConsumeIntInRange(0, 15) else fuzzutil.u16(fdp)
        payload, fds = request(fdp, p, command)
        flags = pick(fdp, [0, 0, 0, 0, m.VFIO_USER_NO_REPLY, m.VFIO_USER_REPLY, 2,
                           m.VFIO_USER_ERROR, fuzzutil.u32(fdp)])
        size = m.HEADER.size + len(payload)
        if not fdp.ConsumeIntInRange(0, 31):
            size = interesting(fdp, 32, (size + 1, size - 1, 0, 15, vc.MAX_MESSAGE_SIZE + 1,
                                         vc.MAX_DRAIN_SIZE + 1))
        out.append((command, flags, payload, size, fds))
        if sum(len(m[2]) + 64 for m in out) > MAX_STREAM:
            break
    return out


# --- the property ----------------------------------------------------------------------------

class Harness:
    def __init__(self, p: fuzzutil.FdPool, baseline: set[int]) -> None:
        self.p, self.baseline = p, baseline
        self.device = DmaEndpoint()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn = vc.VfioUserConnection(theirs, self.device)
        self.expected: list[tuple[int, int]] = []
        real_dispatch = self.conn._dispatch

        def dispatch(msg, problem=None) -> None:
            if msg.type != m.VFIO_USER_REPLY and not msg.no_reply:
                self.expected.append((msg.msg_id, msg.command))
            real_dispatch(msg, problem)
        self.conn._dispatch = dispatch
        fuzzutil.check_failed_reads_close_fds(self.conn, self.held, (OSError, m.ProtocolError))

    def held(self) -> set[int]:
        """Copies of pool fds this input made this process hold."""
        return self.p.held() - self.baseline

    def kept(self) -> int:
        irq = sum(1 for fds in self.conn.irqs.fds.values() for fd in fds if fd is not None)
        maps = sum(1 for region in self.conn.memory if region.mapping is not None)
        return irq + maps

    def send_all(self, stream) -> None:
        for n, (command, flags, payload, size, fds) in enumerate(stream):
            data = m.HEADER.pack(n, command, size & 0xFFFF_FFFF, flags, 0) + payload
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
            check(self.device.engine.status in (0, 1, 2, 3),
                  f"STATUS {self.device.engine.status}")
            held = self.held()
            check(len(held) == self.kept(),
                  f"after a message this process holds pool fds {sorted(held)}; the "
                  f"connection keeps {self.kept()} (IRQ eventfds + DMA mappings)")
        raise fuzzutil.PropertyViolation("the connection never reached the end of the stream")

    def check_replies(self) -> None:
        self.sock.setblocking(False)
        data = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except (BlockingIOError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
        replies = []
        while data:
            check(len(data) >= m.HEADER.size, f"reply stream ends in a header: {data.hex()}")
            msg_id, command, size, flags, err = m.HEADER.unpack_from(data)
            check(m.HEADER.size <= size <= len(data),
                  f"reply {msg_id} announces {size} bytes, {len(data)} left")
            check(flags in (m.VFIO_USER_REPLY, m.VFIO_USER_REPLY | m.VFIO_USER_ERROR),
                  f"reply {msg_id} has flags {flags:#x}")
            if flags & m.VFIO_USER_ERROR:
                check(err != 0 and size == m.HEADER.size,
                      f"error reply {msg_id}: errno {err}, size {size}")
            else:
                check(err == 0, f"reply {msg_id} has errno {err} without the ERROR flag")
            replies.append((msg_id, command))
            data = data[size:]
        check(replies == self.expected, f"replies {replies} != expected {self.expected}")

    def close(self) -> None:
        self.conn.close()
        self.sock.close()


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    p = pool()
    p.reset(RAM_IMAGE)
    stream = build_stream(fdp, p)
    before = fuzzutil.open_fds()
    h = Harness(p, p.held())
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
