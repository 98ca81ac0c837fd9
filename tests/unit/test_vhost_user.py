"""A real VhostUserConnection serving a real Backend, driven over a socketpair the way QEMU
drives it: messages with SCM_RIGHTS fds in, replies out, guest RAM in a shared memfd that the
test also maps to play the guest driver."""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import struct

import pytest

from viommu.backend.backend import Backend
from viommu.events.smmuv3 import EventId, EventRecord
from viommu.transport.vhost_user.connection import VhostUserConnection
from viommu.transport.vhost_user.messages import HEADER, Request

# --- helpers ---------------------------------------------------------------------------------

NEED_REPLY = 0x8
MEM_SIZE = 1 << 20
GPA = 0x4000_0000
UADDR = 0x7F00_0000_0000  # where the "front-end" has guest RAM mapped
QSIZE = 16
RINGS = {0: (0x1000, 0x2000, 0x3000), 1: (0x4000, 0x5000, 0x6000)}  # desc, avail, used
DESC_F_NEXT, DESC_F_WRITE = 1, 2
ATTACH = struct.pack("<B3xIIII", 1, 1, 256, 0, 0)  # domain 1, endpoint 256


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def config(offset: int, data: bytes, flags: int = 0) -> bytes:
    return struct.pack("<III", offset, len(data), flags) + data


def mem_table(nregions: int = 1) -> bytes:
    region = struct.pack("<QQQQ", GPA, MEM_SIZE, UADDR, 0)
    return struct.pack("<II", nregions, 0) + region * nregions


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Guest:
    """The guest driver: split rings and buffers in the shared memfd."""

    def __init__(self, memfd: int) -> None:
        self.ram = mmap.mmap(memfd, MEM_SIZE)
        self.reset_rings()

    def reset_rings(self) -> None:
        self.ram[:0x10000] = bytes(0x10000)
        self.avail_idx = {0: 0, 1: 0}
        self.next_data = 0x10000

    def post(self, q: int, readable: bytes, writable_len: int) -> int:
        """Publish one chain; returns the guest-physical address of its writable part."""
        desc, avail, _ = RINGS[q]
        n = self.avail_idx[q]
        head = 2 * n % QSIZE
        segs = []
        for data, flags in ((readable, 0), (bytes(writable_len), DESC_F_WRITE)):
            if data:
                off, self.next_data = self.next_data, self.next_data + 64
                self.ram[off:off + len(data)] = data
                segs.append((GPA + off, len(data), flags))
        for i, (addr, length, flags) in enumerate(segs):
            more = DESC_F_NEXT if i < len(segs) - 1 else 0
            struct.pack_into("<QIHH", self.ram, desc + 16 * (head + i), addr, length,
                             flags | more, head + i + 1)
        struct.pack_into("<H", self.ram, avail + 4 + 2 * (n % QSIZE), head)
        self.avail_idx[q] = n + 1
        struct.pack_into("<H", self.ram, avail + 2, n + 1)
        return segs[-1][0]

    def used(self, q: int) -> list[tuple[int, int]]:
        used = RINGS[q][2]
        idx = struct.unpack_from("<H", self.ram, used + 2)[0]
        return [struct.unpack_from("<II", self.ram, used + 4 + 8 * i) for i in range(idx)]

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[gpa - GPA:gpa - GPA + n])


class Frontend:
    """Plays QEMU: sends vhost-user messages and reads the replies."""

    def __init__(self, tmp_path) -> None:
        self.backend = Backend(str(tmp_path / "vu.sock"), None, [256])
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        self.readers: dict[int, object] = {}
        self.conn = VhostUserConnection(theirs, self.backend.vhost, self)
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.guest = Guest(self.memfd)
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}

    # The connection watches kick fds through us (Readers), as it would through the loop.

    def add_reader(self, fd: int, callback) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def send(self, request: int, payload: bytes = b"", fds=(), need_reply=False) -> None:
        flags = 0x1 | (NEED_REPLY if need_reply else 0)
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([HEADER.pack(request, flags, len(payload)) + payload], ancdata)
        self.conn.on_readable()

    def recv(self) -> tuple[int, int, bytes]:
        request, flags, size = HEADER.unpack(self._recv_exact(HEADER.size))
        return request, flags, self._recv_exact(size)

    def ask(self, request: int, payload: bytes = b"", fds=(), need_reply=False):
        self.send(request, payload, fds, need_reply)
        return self.recv()

    def ack(self, request: int, payload: bytes = b"", fds=()) -> int:
        """Send with NEED_REPLY; the u64 status of the ack (0 = success)."""
        reply_request, _flags, body = self.ask(request, payload, fds, need_reply=True)
        assert reply_request == request
        return struct.unpack("<Q", body)[0]

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the back-end closed the connection"
            data += chunk
        return data

    def start(self, bases=(0, 0)) -> list[int]:
        """QEMU's vhost_dev_start; returns the SET_VRING_ENABLE acks."""
        self.send(Request.SET_FEATURES, u64(self.backend.vhost.features()))
        self.send(Request.SET_MEM_TABLE, mem_table(), [self.memfd])
        for q, (desc, avail, used) in RINGS.items():
            self.send(Request.SET_VRING_NUM, state(q, QSIZE))
            self.send(Request.SET_VRING_BASE, state(q, bases[q]))
            self.send(Request.SET_VRING_ADDR, struct.pack(
                "<IIQQQQ", q, 0, UADDR + desc, UADDR + used, UADDR + avail, 0))
            for fds, request in ((self.kick_fds, Request.SET_VRING_KICK),
                                 (self.call_fds, Request.SET_VRING_CALL)):
                if q in fds:
                    os.close(fds[q])
                fds[q] = os.eventfd(0, os.EFD_NONBLOCK)
                self.send(request, u64(q), [fds[q]])
        return [self.ack(Request.SET_VRING_ENABLE, state(q, 1)) for q in RINGS]

    def stop(self) -> list[bytes]:
        """QEMU's vhost_dev_stop; returns the GET_VRING_BASE reply payloads."""
        return [self.ask(Request.GET_VRING_BASE, state(q, 0))[2] for q in RINGS]

    def kick(self, q: int) -> None:
        os.eventfd_write(self.kick_fds[q], 1)
        self.readers[self.conn.vrings[q].kick_fd]()

    def request(self, readable: bytes, writable_len: int = 4) -> int:
        """Post a request on the requestq and kick; the status byte the device wrote."""
        wgpa = self.guest.post(0, readable, writable_len)
        self.kick(0)
        return self.guest.read(wgpa + writable_len - 4, 1)[0]

    def close(self) -> None:
        self.conn.close()
        self.sock.close()
        self.guest.ram.close()
        for fd in [self.memfd, *self.kick_fds.values(), *self.call_fds.values()]:
            os.close(fd)


@pytest.fixture
def fe(tmp_path):
    frontend = Frontend(tmp_path)
    yield frontend
    frontend.close()



# --- replies, features, config ----------------------------------------------------------------


@pytest.mark.parametrize("request_id,payload,size", [
    (Request.GET_FEATURES, b"", 8),
    (Request.GET_PROTOCOL_FEATURES, b"", 8),
    (Request.GET_QUEUE_NUM, b"", 8),
    (Request.GET_MAX_MEM_SLOTS, b"", 8),
    (Request.GET_STATUS, b"", 8),
    (Request.GET_VRING_BASE, state(0, 0), 8),
    (Request.GET_CONFIG, config(0, bytes(40)), 52),
], ids=lambda v: v.name if isinstance(v, Request) else "payload" if isinstance(v, bytes) else None)
def test_reply_has_flags_0x5_and_its_message_size(fe, request_id, payload, size) -> None:
    reply_request, flags, body = fe.ask(request_id, payload)
    assert (reply_request, flags, len(body)) == (request_id, 0x5, size)


def test_need_reply_is_answered_with_flags_0x5_and_u64_0(fe) -> None:
    assert fe.ask(Request.SET_OWNER, need_reply=True) == (Request.SET_OWNER, 0x5, u64(0))


def test_message_without_need_reply_gets_no_reply(fe) -> None:
    fe.send(Request.SET_OWNER)
    fe.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        fe.sock.recv(1)


def test_features_offer_version_1_protocol_features_map_unmap_not_access_platform(fe) -> None:
    features = struct.unpack("<Q", fe.ask(Request.GET_FEATURES)[2])[0]
    assert [features >> bit & 1 for bit in (32, 30, 2, 33)] == [1, 1, 1, 0]


def test_protocol_features_offer_config_and_reply_ack_and_no_bit_from_20(fe) -> None:
    features = struct.unpack("<Q", fe.ask(Request.GET_PROTOCOL_FEATURES)[2])[0]
    assert (features >> 9 & 1, features >> 3 & 1, features >> 20) == (1, 1, 0)


def test_get_config_returns_the_40_byte_virtio_iommu_config(fe) -> None:
    body = fe.ask(Request.GET_CONFIG, config(0, bytes(40)))[2]
    offset, size, flags = struct.unpack_from("<III", body)
    page_size_mask = struct.unpack_from("<Q", body, 12)[0]
    probe_size = struct.unpack_from("<I", body, 12 + 32)[0]
    assert (offset, size, flags, len(body) - 12) == (0, 40, 0, 40)
    assert page_size_mask != 0 and probe_size != 0


def test_get_config_of_a_sub_range_returns_that_slice(fe) -> None:
    whole = fe.ask(Request.GET_CONFIG, config(0, bytes(40)))[2][12:]
    assert fe.ask(Request.GET_CONFIG, config(32, bytes(5)))[2] == config(32, whole[32:37])


def test_set_config_of_the_bypass_byte_sets_device_bypass(fe) -> None:
    fe.send(Request.SET_CONFIG, config(36, b"\x01"))
    assert fe.backend.device.bypass is True


def test_set_config_with_need_reply_is_acked_with_0(fe) -> None:
    assert fe.ack(Request.SET_CONFIG, config(36, b"\x01")) == 0


# --- malformed and unknown messages -----------------------------------------------------------


def test_unknown_message_with_need_reply_gets_nonzero_u64_with_its_id(fe) -> None:
    reply_request, flags, body = fe.ask(99, need_reply=True)
    assert (reply_request, flags, len(body)) == (99, 0x5, 8)
    assert struct.unpack("<Q", body)[0] != 0


def test_unknown_message_leaves_the_connection_serving(fe) -> None:
    fe.ask(99, need_reply=True)
    assert fe.ask(Request.GET_FEATURES)[2] == u64(fe.backend.vhost.features())


def test_unknown_message_closes_the_fd_it_carries(fe) -> None:
    efd = os.eventfd(0)
    before = open_fds()
    fe.ask(99, fds=[efd], need_reply=True)
    os.close(efd)
    assert open_fds() == before - 1


def test_unsupported_check_device_state_is_answered_as_a_failure(fe) -> None:
    assert fe.ask(Request.CHECK_DEVICE_STATE)[2] != u64(0)


def test_set_vring_kick_with_two_fds_is_nacked(fe) -> None:
    a, b = os.eventfd(0), os.eventfd(0)
    assert fe.ack(Request.SET_VRING_KICK, u64(0), [a, b]) != 0
    os.close(a)
    os.close(b)


def test_set_vring_kick_with_two_fds_closes_both(fe) -> None:
    a, b = os.eventfd(0), os.eventfd(0)
    before = open_fds()
    fe.ack(Request.SET_VRING_KICK, u64(0), [a, b])
    os.close(a)
    os.close(b)
    assert open_fds() == before - 2


@pytest.mark.parametrize("nregions,nfds", [(1, 0), (1, 2), (2, 1)])
def test_set_mem_table_with_a_different_number_of_fds_than_regions_is_nacked(
        fe, nregions, nfds) -> None:
    assert fe.ack(Request.SET_MEM_TABLE, mem_table(nregions), [fe.memfd] * nfds) != 0


# --- vring lifecycle and the data plane ----------------------------------------------------------


def test_start_sequence_acks_every_vring_enable_with_0(fe) -> None:
    assert fe.start() == [0, 0]


def test_start_sequence_starts_requestq_and_eventq(fe) -> None:
    fe.start()
    assert sorted(fe.backend.vhost.rings()) == [0, 1]


def test_kicked_attach_is_answered_with_used_length_4_and_status_ok(fe) -> None:
    fe.start()
    wgpa = fe.guest.post(0, ATTACH, 4)
    assert fe.guest.used(0) == []  # nothing is served before the kick
    fe.kick(0)
    assert (fe.guest.used(0), fe.guest.read(wgpa, 1)) == ([(0, 4)], b"\x00")


def test_answered_request_signals_the_call_eventfd(fe) -> None:
    fe.start()
    fe.request(ATTACH)
    assert select.select([fe.call_fds[0]], [], [], 0)[0] == [fe.call_fds[0]]


def test_get_vring_base_replies_index_and_last_avail(fe) -> None:
    fe.start()
    fe.request(ATTACH)
    assert fe.ask(Request.GET_VRING_BASE, state(0, 0))[2] == state(0, 1)


def test_get_vring_base_stops_the_ring(fe) -> None:
    fe.start()
    fe.ask(Request.GET_VRING_BASE, state(0, 0))
    assert 0 not in fe.backend.vhost.rings()


def test_restart_from_base_0_after_served_requests_resets_the_device(fe) -> None:
    fe.start()
    assert fe.request(ATTACH) == 0
    assert fe.stop()[0] == state(0, 1)
    fe.guest.reset_rings()
    fe.start(bases=(0, 0))
    assert (fe.backend.device.domains, fe.backend.vhost.resets) == ({}, 1)


def test_restart_at_the_stopped_base_and_addresses_keeps_the_domain(fe) -> None:
    fe.start()
    fe.request(ATTACH)
    fe.stop()
    fe.start(bases=(1, 0))
    assert (list(fe.backend.device.domains), fe.backend.vhost.resets) == ([1], 0)


def test_guest_reset_counts_a_pending_event_lost(fe) -> None:
    fe.start()
    fe.request(ATTACH)
    fe.stop()
    fe.backend.relay.submit(EventRecord(event_id=EventId.C_BAD_STE, sid=256))
    fe.guest.reset_rings()
    fe.start(bases=(0, 0))
    assert fe.backend.relay.lost == 1


MAP = struct.pack("<B3xIQQQI", 3, 1, 0x10_0000, 0x10_0FFF, 0x20_0000, 3)  # domain 1, RW


def test_map_is_served_after_a_guest_reset(fe) -> None:
    fe.start()
    fe.request(ATTACH)
    fe.stop()
    fe.guest.reset_rings()
    fe.start(bases=(0, 0))
    fe.request(ATTACH)
    assert fe.request(MAP) == 0


def test_a_corrupt_requestq_marks_the_device_broken_and_signals_the_vring_error_fd(fe) -> None:
    err_fd = os.eventfd(0, os.EFD_NONBLOCK)
    fe.send(Request.SET_VRING_ERR, u64(0), [err_fd])
    fe.start()
    avail = RINGS[0][1]
    struct.pack_into("<HH", fe.guest.ram, avail + 2, 1, QSIZE)  # avail idx 1, head = size
    fe.kick(0)
    assert "head index" in fe.backend.vhost.broken
    assert os.eventfd_read(err_fd) == 1
    os.close(err_fd)


def test_a_guest_reset_clears_a_broken_device(fe) -> None:
    fe.start()
    fe.request(ATTACH)
    fe.backend.vhost.ring_broken("earlier corruption", fe.conn.vrings[0])
    fe.stop()
    fe.guest.reset_rings()
    fe.start()  # rings restarted at base 0: the guest reset
    assert fe.backend.vhost.broken is None


def test_a_guest_reset_clears_sticky_config_faults(fe) -> None:
    fe.start()
    fe.request(ATTACH)
    fe.backend.control.call("inject-event", {"type": "C_BAD_CD", "sid": 256, "ssid": 1})
    [before] = fe.backend.control.call("query-endpoints")
    assert before["config_fault"] == "C_BAD_CD"
    fe.stop()
    fe.guest.reset_rings()
    fe.start()  # rings restarted at base 0: the guest reset (a reboot, or system_reset)
    [after] = fe.backend.control.call("query-endpoints")
    assert fe.backend.vhost.resets == 1 and after["config_fault"] is None


@pytest.mark.parametrize("command,args", [
    ("memory-read", {"gpa": -1, "size": 8}),
    ("memory-write", {"gpa": -1, "data": "00"}),
    ("memory-read", {"gpa": 1 << 64, "size": 8}),
    ("stage2-set", {"ipa": -4096, "size": 4096, "access": "ro"}),
])
def test_a_negative_or_too_big_guest_address_is_an_error_naming_the_argument(
        fe, command: str, args: dict) -> None:
    from viommu.transport.control import CommandError

    fe.start()  # guest memory is there: the address itself is what is wrong
    with pytest.raises(CommandError) as error:
        fe.backend.control.call(command, args)
    name = "ipa" if "ipa" in args else "gpa"
    assert error.value.desc.startswith(f"{name} is a 64-bit guest-physical address")
