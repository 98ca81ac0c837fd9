"""The iommufd host edge against generated fault and vEVENTQ streams over socketpairs
(Linux include/uapi/linux/iommufd.h, drivers/iommu/iommufd/eventq.c). SOCK_STREAM
throughout, so partial reads are real and tested explicitly."""

from __future__ import annotations

import socket
import struct

import pytest

from viommu.events.page_requests import PageRequest, ResponseCode
from viommu.events.smmuv3 import EventId, EventRecord
from viommu.transport.iommufd import (
    IOMMU_FAULT_QUEUE_ALLOC,
    IOMMU_HWPT_ALLOC,
    IOMMU_PGFAULT_FLAGS_LAST_PAGE,
    IOMMU_PGFAULT_FLAGS_PASID_VALID,
    IOMMU_PGFAULT_PERM_EXEC,
    IOMMU_PGFAULT_PERM_PRIV,
    IOMMU_PGFAULT_PERM_READ,
    IOMMU_PGFAULT_PERM_WRITE,
    IOMMU_VDEVICE_ALLOC,
    IOMMU_VEVENTQ_ALLOC,
    IOMMU_VEVENTQ_FLAG_LOST_EVENTS,
    IOMMU_VIOMMU_ALLOC,
    FaultQueue,
    HwptPageResponse,
    HwptPgfault,
    PriMustBeDisabled,
    UnknownCookie,
    VeventHeader,
    VeventQueue,
)

DEV_ID = 7  # iommufd device object ID
EP = 256  # virtio endpoint ID (01:00.0) = vSID
RW = IOMMU_PGFAULT_PERM_READ | IOMMU_PGFAULT_PERM_WRITE
LAST = IOMMU_PGFAULT_FLAGS_LAST_PAGE
INT_MAX = 0x7FFF_FFFF  # the kernel's vEVENTQ sequence bound, written out on purpose


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.settimeout(1.0)
    yield ours, theirs
    ours.close()
    theirs.close()


@pytest.fixture
def faults(pair):
    ours, theirs = pair
    return FaultQueue(ours.fileno(), {DEV_ID: EP}), theirs


def fault(cookie: int, *, last: bool = True, perm: int = RW, addr: int = 0x10000,
          grpid: int = 3, pasid: int | None = None, dev_id: int = DEV_ID) -> bytes:
    flags = (LAST if last else 0) | (IOMMU_PGFAULT_FLAGS_PASID_VALID if pasid is not None else 0)
    return HwptPgfault(flags, dev_id, pasid or 0, grpid, perm, addr, 0, cookie).encode()


def responses(peer: socket.socket) -> list[tuple[int, int]]:
    """Everything written back so far, as (cookie, code)."""
    peer.setblocking(False)
    try:
        data = peer.recv(4096)
    except BlockingIOError:
        data = b""
    answers = [HwptPageResponse.decode(data[i:i + 8]) for i in range(0, len(data), 8)]
    return [(a.cookie, a.code) for a in answers]


# ---- codecs ------------------------------------------------------------------------------


def test_pgfault_decodes_the_digest_layout_byte_for_byte() -> None:
    raw = bytes.fromhex(
        "03000000"  # flags: PASID_VALID | LAST_PAGE
        "07000000"  # dev_id
        "45230100"  # pasid 0x12345
        "ff010000"  # grpid 0x1ff
        "0b000000"  # perm: READ | WRITE | PRIV
        "00000000"  # __reserved
        "00705634127f0000"  # addr 0x7f1234567000
        "00000000"  # length
        "2a000000")  # cookie 42
    record = HwptPgfault(flags=3, dev_id=7, pasid=0x12345, grpid=0x1FF, perm=0xB,
                         addr=0x7F12_3456_7000, length=0, cookie=42)
    assert HwptPgfault.decode(raw) == record
    assert record.encode() == raw


def test_page_response_is_cookie_then_code() -> None:
    assert HwptPageResponse(42, 1).encode() == bytes.fromhex("2a000000" "01000000")
    assert HwptPageResponse.decode(bytes.fromhex("05000000" "00000000")) == HwptPageResponse(5, 0)


def test_vevent_is_header_then_smmuv3_record_with_vsid() -> None:
    raw = bytes.fromhex(
        "00000000" "05000000"  # header: flags 0, sequence 5
        "1000000000010000"  # DW0: F_TRANSLATION, StreamID = vSID 256
        "0000000008000000"  # DW1: RnW (bit 35)
        "0000010000000000"  # DW2: InputAddr 0x10000
        "0000000000000000")  # DW3
    assert VeventHeader.decode(raw[:8]) == VeventHeader(flags=0, sequence=5)
    event = EventRecord.decode(raw[8:])
    assert (event.event_id, event.sid, event.rnw, event.address) == (0x10, EP, True, 0x10000)


def test_ioctl_numbers_are_io_semicolon_cmd() -> None:
    assert (IOMMU_HWPT_ALLOC, IOMMU_FAULT_QUEUE_ALLOC, IOMMU_VIOMMU_ALLOC, IOMMU_VDEVICE_ALLOC,
            IOMMU_VEVENTQ_ALLOC) == (0x3B89, 0x3B8E, 0x3B90, 0x3B91, 0x3B93)


# ---- fault queue ------------------------------------------------------------------------


def test_group_of_three_is_reassembled_and_answered_once_on_the_wire(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(9, last=False, addr=0x1000) + fault(9, last=False, addr=0x2000)
                 + fault(9, addr=0x3000))
    [group] = queue.read_groups(timeout=1)
    assert group.cookie == 9 and queue.pending() == [9]
    assert [(r.sid, r.address, r.last) for r in group.requests] == [
        (EP, 0x1000, False), (EP, 0x2000, False), (EP, 0x3000, True)]
    queue.respond(9, ResponseCode.SUCCESS)
    assert responses(peer) == [(9, 0)]
    assert queue.pending() == []


def test_unaligned_fault_address_gives_its_page_and_keeps_the_exact_one(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(1, addr=0x12345))  # an SMMU stall reports the exact IOVA
    [group] = queue.read_groups(timeout=1)
    assert (group.requests[0].address, group.records[0].addr) == (0x12000, 0x12345)


def test_single_request_group_is_complete_on_its_own(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(4, grpid=0x1FF))
    [group] = queue.read_groups(timeout=1)
    assert group.requests == (PageRequest(sid=EP, grpid=0x1FF, address=0x10000, last=True,
                                          read=True, write=True),)


def test_group_split_mid_record_waits_for_its_last_page(faults) -> None:
    queue, peer = faults
    stream = fault(2, last=False) + fault(2)
    peer.sendall(stream[:60])
    assert queue.on_readable() == []
    peer.sendall(stream[60:])
    [group] = queue.on_readable()
    assert len(group.requests) == 2


@pytest.mark.parametrize("pasid,expected", [(9, 9), (None, None)])
def test_pasid_only_when_pasid_valid(faults, pasid, expected) -> None:
    queue, peer = faults
    # Without PASID_VALID the pasid field still carries junk: it must be ignored.
    raw = bytearray(fault(1, pasid=pasid))
    struct.pack_into("<I", raw, 8, 9)
    peer.sendall(raw)
    [group] = queue.read_groups(timeout=1)
    assert group.requests[0].pasid == expected


@pytest.mark.parametrize("perm,field", [(IOMMU_PGFAULT_PERM_READ, "read"),
                                        (IOMMU_PGFAULT_PERM_WRITE, "write"),
                                        (IOMMU_PGFAULT_PERM_EXEC, "exec"),
                                        (IOMMU_PGFAULT_PERM_PRIV, "priv")])
def test_each_perm_bit_sets_only_its_flag(faults, perm, field) -> None:
    queue, peer = faults
    peer.sendall(fault(1, perm=perm))
    [group] = queue.read_groups(timeout=1)
    request = group.requests[0]
    flags = {f: getattr(request, f) for f in ("read", "write", "exec", "priv")}
    assert flags == {f: f == field for f in flags}


def test_last_page_without_read_or_write_is_a_stop_marker(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(1, perm=0, pasid=5))
    [group] = queue.read_groups(timeout=1)
    assert group.requests[0].is_stop_marker and group.is_stop_marker
    assert queue.pending() == [1]  # iommufd still holds its cookie


def test_unknown_or_answered_cookie_is_refused_and_writes_nothing(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(3))
    queue.read_groups(timeout=1)
    with pytest.raises(UnknownCookie, match="cookie 4 is not pending"):
        queue.respond(4, ResponseCode.SUCCESS)
    queue.respond(3, ResponseCode.INVALID_REQUEST)
    with pytest.raises(UnknownCookie):
        queue.respond(3, ResponseCode.SUCCESS)
    assert responses(peer) == [(3, 1)]


def test_response_failure_writes_invalid_and_demands_pri_disable(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(6))
    queue.read_groups(timeout=1)
    with pytest.raises(PriMustBeDisabled, match=f"disable PRI for endpoint {EP:#x}") as err:
        queue.respond(6, ResponseCode.RESPONSE_FAILURE)
    assert (err.value.cookie, err.value.sid, err.value.dev_id) == (6, EP, DEV_ID)
    assert responses(peer) == [(6, 1)]
    assert queue.pending() == []


def test_close_answers_every_pending_group_invalid(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(1) + fault(2) + fault(3))
    queue.read_groups(timeout=1)
    queue.respond(2, ResponseCode.SUCCESS)
    assert queue.close() == 2
    assert responses(peer) == [(2, 0), (1, 1), (3, 1)]
    with pytest.raises(UnknownCookie):
        queue.respond(1, ResponseCode.SUCCESS)


def test_group_read_after_close_is_answered_invalid_not_left_pending(faults) -> None:
    queue, peer = faults
    queue.close()
    peer.sendall(fault(4))
    assert queue.on_readable() == []
    assert responses(peer) == [(4, 1)] and queue.pending() == []


def test_group_from_an_unmapped_device_is_answered_invalid_at_once(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(8, dev_id=99))
    assert queue.on_readable() == []
    assert responses(peer) == [(8, 1)]
    assert queue.pending() == [] and queue.rejected == 1


def test_stall_tag_wider_than_the_prg_index_is_answered_invalid(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(8, grpid=0x200))  # SMMU stall: grpid = 16-bit STAG
    assert queue.on_readable() == []
    assert responses(peer) == [(8, 1)]


def test_record_reusing_a_pending_cookie_is_counted_not_a_second_group(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(5, addr=0x1000) + fault(5, addr=0x2000))
    [group] = queue.on_readable()
    assert group.requests[0].address == 0x1000
    assert queue.pending() == [5] and queue.errors == 1


def test_fault_stream_ending_inside_a_group_is_counted(faults) -> None:
    queue, peer = faults
    peer.sendall(fault(1, last=False) + fault(1)[:10])
    peer.shutdown(socket.SHUT_WR)
    assert queue.read_groups(timeout=1) == []
    assert queue.closed and queue.errors == 1 and queue.pending() == []


# ---- vEVENTQ ----------------------------------------------------------------------------


def vevent(sequence: int, sid: int = EP, address: int = 0x10000) -> bytes:
    event = EventRecord(event_id=EventId.F_TRANSLATION, sid=sid, rnw=True, address=address)
    return VeventHeader(0, sequence).encode() + event.encode()


def lost_header(sequence: int) -> bytes:
    return VeventHeader(IOMMU_VEVENTQ_FLAG_LOST_EVENTS, sequence).encode()


@pytest.fixture
def events(pair):
    ours, theirs = pair
    seen: dict[str, list] = {"events": [], "lost": []}
    queue = VeventQueue(ours.fileno(), seen["events"].append, seen["lost"].append)
    return queue, theirs, seen


def test_vevent_records_reach_the_callback_with_sid_as_vsid(events) -> None:
    queue, peer, seen = events
    peer.sendall(vevent(0, sid=EP) + vevent(1, sid=EP + 8, address=0x2000))
    queue.on_readable()
    assert [(e.sid, e.address) for e in seen["events"]] == [(EP, 0x10000), (EP + 8, 0x2000)]
    assert queue.counters() == {"received": 2, "lost": 0, "gaps": 0, "lost_headers": 0,
                                "errors": 0}


def test_sequence_gap_of_three_counts_three_lost(events) -> None:
    queue, peer, seen = events
    peer.sendall(vevent(0) + vevent(1) + vevent(5))
    queue.on_readable()
    assert (queue.received, queue.lost, queue.gaps, seen["lost"]) == (3, 3, 1, [3])


def test_wrap_from_int_max_to_zero_is_not_a_gap(pair) -> None:
    ours, peer = pair
    lost: list[int] = []
    queue = VeventQueue(ours.fileno(), lambda e: None, lost.append,
                        expect_sequence=INT_MAX - 1)
    peer.sendall(vevent(INT_MAX - 1) + vevent(INT_MAX) + vevent(0) + vevent(1))
    queue.on_readable()
    assert (queue.received, queue.lost, queue.errors, lost) == (4, 0, 0, [])


@pytest.mark.parametrize("stream,header_seq,lost", [
    (vevent(0) + vevent(1) + lost_header(2), 2, 1),  # uAPI doc: it carries the lost number
    (vevent(0) + lost_header(3), 3, 3),  # 1 and 2 skipped, then 3 dropped at the tail
])
def test_lost_events_header_counts_the_events_it_stands_for(events, stream, header_seq,
                                                            lost) -> None:
    queue, peer, seen = events
    peer.sendall(stream)
    queue.on_readable()
    assert (queue.lost, queue.lost_headers, seen["lost"]) == (lost, 1, [lost])
    peer.sendall(vevent(header_seq + 1))  # the next event is no further loss
    queue.on_readable()
    assert queue.lost == lost and queue.errors == 0


@pytest.mark.parametrize("split", [3, 8, 20])
def test_record_split_across_two_reads(events, split) -> None:
    queue, peer, seen = events
    raw = vevent(0)
    peer.sendall(raw[:split])
    assert queue.on_readable() == []
    peer.sendall(raw[split:])
    assert [e.address for e in queue.on_readable()] == [0x10000]
    assert queue.errors == 0


def test_unknown_header_flag_is_counted_and_the_next_read_resyncs(events) -> None:
    queue, peer, seen = events
    peer.sendall(VeventHeader(1 << 5, 0).encode() + b"\xee" * 32)
    assert queue.on_readable() == []
    assert queue.errors == 1 and "flags 0x20" in queue.last_error
    peer.sendall(vevent(0))
    assert len(queue.on_readable()) == 1


def test_truncated_stream_at_eof_is_counted_not_raised(events) -> None:
    queue, peer, seen = events
    peer.sendall(vevent(0) + vevent(1)[:20])
    peer.shutdown(socket.SHUT_WR)
    queue.on_readable()
    queue.on_readable()
    assert (queue.received, queue.errors, queue.closed) == (1, 1, True)


def test_sequence_going_backwards_is_an_error_not_two_billion_lost(events) -> None:
    queue, peer, seen = events
    peer.sendall(vevent(0) + vevent(1) + vevent(2) + vevent(0))
    queue.on_readable()
    assert (queue.received, queue.lost, queue.errors) == (4, 0, 1)


def test_empty_read_on_a_non_socket_is_not_eof(tmp_path) -> None:
    # An iommufd fd (anon inode) returns 0 when nothing is queued; that is not a close.
    with open(tmp_path / "empty", "wb+") as f:
        queue = VeventQueue(f.fileno(), lambda e: None)
        assert queue.on_readable() == []
        assert not queue.closed
