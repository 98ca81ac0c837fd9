"""The virtio-blk requestq walker (ext/blkq.pxi, ext/blk_requests.pxi) against a fake driver
in synthetic guest memory behind a MAP domain (tests/blk_driver.py): every access through
translation, requests as virtio spec 5.2.6 defines them, data faults as VIRTIO_BLK_S_IOERR
with an SMMUv3 event, ring faults and forbidden chains as a stopped queue."""

from __future__ import annotations

import ctypes
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blk_driver import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    PAGE,
    READ,
    SID,
    T_IN,
    T_OUT,
    WRITE,
    FakeBlkDriver,
    pattern,
)
from viommu import _dataplane as hw
from viommu.events.smmuv3 import EventId, EventRecord
from viommu.uapi import BlkRequestType, BlkStatus

BLK_OK, BLK_IOERR, BLK_UNSUPP = (int(BlkStatus.S_OK), int(BlkStatus.S_IOERR),
                                 int(BlkStatus.S_UNSUPP))


@pytest.fixture
def make(tmp_path: Path) -> Iterator:
    made: list[FakeBlkDriver] = []

    def make_driver(**kwargs) -> FakeBlkDriver:
        made.append(FakeBlkDriver(tmp_path / f"d{len(made)}", **kwargs))
        return made[-1]

    for i in range(8):
        (tmp_path / f"d{i}").mkdir()
    yield make_driver
    for d in made:
        d.close()


@pytest.fixture
def d(make) -> FakeBlkDriver:
    return make()


def disk(d: FakeBlkDriver, sector: int, length: int) -> bytes:
    return d.image.read_bytes()[sector * 512:sector * 512 + length]


def events(d: FakeBlkDriver) -> list[EventRecord]:
    records, dropped = d.queue.take_faults()
    assert dropped == 0
    return [EventRecord.decode(r) for r in records]


# --- requests -----------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_a_write_lands_in_the_file_and_a_read_brings_it_back(d, indirect: bool) -> None:
    data = pattern(16, 8192)
    w = d.request(T_OUT, 16, data=data, indirect=indirect)
    assert d.kick() == 1
    assert d.take_used() == [(w.head, 1)]  # used length: the status byte only
    assert d.status(w) == BLK_OK and disk(d, 16, 8192) == data
    r = d.request(T_IN, 16, in_len=8192, indirect=indirect, segments=3)
    assert d.kick() == 1
    assert d.take_used() == [(r.head, 8192 + 1)]  # data and status written
    assert d.status(r) == BLK_OK and d.read(r.data_gpa, 8192) == data
    assert d.queue.counters()["bytes_written"] == d.queue.counters()["bytes_read"] == 8192
    assert d.queue.error == 0 and events(d) == []


def test_several_requests_in_one_kick_complete_in_ring_order(d) -> None:
    reqs = [d.request(T_OUT, 8 * i, data=pattern(8 * i, 4096)) for i in range(5)]
    assert d.kick() == 5
    assert [head for head, _ in d.take_used()] == [r.head for r in reqs]
    assert disk(d, 0, 5 * 4096) == b"".join(pattern(8 * i, 4096) for i in range(5))


def test_a_header_straddling_two_iova_pages_is_read_whole(d) -> None:
    """Linux maps out_hdr with its own dma_map_single: 16 bytes can cross a page."""
    header = d.alloc(PAGE, align=PAGE) + PAGE - 8
    data = pattern(2, 1024)
    w = d.request(T_OUT, 2, data=data, header_gpa=header)
    d.kick()
    assert d.status(w) == BLK_OK and disk(d, 2, 1024) == data


def test_a_used_element_straddling_a_page_is_written_in_two_pieces(make) -> None:
    """Used elements sit at used+4+8i (4 mod 8): with the used ring at 0x...ff8, element 0
    covers the page end."""
    d = make(used_offset=PAGE - 8)
    assert (d.used + 4) % PAGE == PAGE - 4  # element 0: id on one page, len on the next
    w = d.request(T_OUT, 0, data=pattern(0, 512))
    d.kick()
    assert d.take_used() == [(w.head, 1)] and d.status(w) == BLK_OK


def test_data_split_across_many_descriptors_and_pages(d) -> None:
    data = pattern(40, 5 * 4096 + 1024)
    w = d.request(T_OUT, 40, data=data, segments=7)
    d.kick()
    assert d.status(w) == BLK_OK and disk(d, 40, len(data)) == data
    r = d.request(T_IN, 40, in_len=len(data), segments=5, indirect=True)
    d.kick()
    assert d.read(r.data_gpa, len(data)) == data


def test_a_request_larger_than_one_batch_of_pages_is_moved_whole(make) -> None:
    """More pages than one preadv takes (1024)."""
    d = make(mem_size=16 << 20, image_size=8 << 20)
    data = pattern(0, 1100 * PAGE)
    w = d.request(T_OUT, 0, data=data)
    d.kick()
    assert d.status(w) == BLK_OK and disk(d, 0, len(data)) == data
    r = d.request(T_IN, 0, in_len=len(data))
    d.kick()
    assert d.status(r) == BLK_OK and d.read(r.data_gpa, len(data)) == data


def test_flush_get_id_and_an_unknown_type(d) -> None:
    f = d.request(int(BlkRequestType.T_FLUSH))
    g = d.request(int(BlkRequestType.T_GET_ID), in_len=hw.VIRTIO_BLK_ID_BYTES)
    u = d.request(99, in_len=8)
    d.kick()
    assert [d.status(r) for r in (f, g, u)] == [BLK_OK, BLK_OK, BLK_UNSUPP]
    assert d.read(g.data_gpa, 20) == b"vblk-serial" + bytes(9)
    counters = d.queue.counters()
    assert (counters["flushes"], counters["get_ids"], counters["unsupported"]) == (1, 1, 1)


def test_out_of_range_and_partial_sectors_are_io_errors(d) -> None:
    capacity = (1 << 20) // 512
    reqs = [d.request(T_OUT, capacity - 1, data=pattern(0, 1024)),  # past the end
            d.request(T_OUT, 0, data=b"x" * 700),                     # not whole sectors
            d.request(T_IN, 1 << 62, in_len=512),                      # sector * 512 wraps
            d.request(T_OUT, capacity - 2, data=pattern(0, 1024))]     # the last two: fine
    d.kick()
    assert [d.status(r) for r in reqs] == [BLK_IOERR, BLK_IOERR, BLK_IOERR, BLK_OK]
    assert disk(d, 0, 1024) == bytes(1024)


def test_a_read_only_disk_fails_writes_and_serves_reads(make) -> None:
    d = make(read_only=True)
    w = d.request(T_OUT, 0, data=pattern(0, 512))
    r = d.request(T_IN, 0, in_len=512)
    d.kick()
    assert (d.status(w), d.status(r)) == (BLK_IOERR, BLK_OK)
    assert disk(d, 0, 512) == bytes(512)


def test_discard_and_write_zeroes(d) -> None:
    d.request(T_OUT, 0, data=pattern(0, 8192))
    d.kick()
    seg = struct.pack("<QII", 4, 4, 0)
    zeroes = d.request(int(BlkRequestType.T_WRITE_ZEROES), data=seg)
    discard = d.request(int(BlkRequestType.T_DISCARD), data=struct.pack("<QII", 12, 2, 0))
    unmap = d.request(int(BlkRequestType.T_DISCARD), data=struct.pack("<QII", 0, 1, 1))
    d.kick()
    assert [d.status(r) for r in (zeroes, discard, unmap)] == [BLK_OK, BLK_OK, BLK_UNSUPP]
    assert disk(d, 4, 2048) == bytes(2048)  # zeroed
    assert disk(d, 0, 2048) == pattern(0, 2048)  # untouched before them


def zero_range_refused(path: Path) -> bool:
    """Whether the file system under `path` refuses fallocate(FALLOC_FL_ZERO_RANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_RDWR)
    try:
        return libc.fallocate(fd, 0x10, 0, 4096) != 0  # FALLOC_FL_ZERO_RANGE
    finally:
        os.close(fd)


def test_write_zeroes_where_the_file_system_cannot_zero_a_range_writes_every_zero() -> None:
    """tmpfs refuses FALLOC_FL_ZERO_RANGE (mm/shmem.c shmem_fallocate): the zeroes are
    written, in more than one chunk and a remainder, and nothing past them is touched."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        d = FakeBlkDriver(Path(tmp))
        try:
            assert zero_range_refused(d.image)
            ones = b"\xff" * (1 << 20)
            os.pwrite(d.fd, ones, 0)
            sectors = 2 * 128 + 9  # two 64 KiB chunks and a remainder
            zeroes = d.request(int(BlkRequestType.T_WRITE_ZEROES),
                               data=struct.pack("<QII", 8, sectors, 0))
            d.kick()
            assert d.status(zeroes) == BLK_OK
            image = d.image.read_bytes()
            assert image[:8 * 512] == ones[:8 * 512]
            assert image[8 * 512:(8 + sectors) * 512] == bytes(sectors * 512)
            assert image[(8 + sectors) * 512:] == ones[(8 + sectors) * 512:]
        finally:
            d.close()


# --- data faults: BLK_IOERR and an event ------------------------------------------------------


def test_a_write_from_an_unmapped_buffer_fails_and_leaves_the_disk_alone(d) -> None:
    d.request(T_OUT, 0, data=pattern(0, 4096, seed=1))
    d.kick()
    w = d.request(T_OUT, 0, data=pattern(0, 4096, seed=2))
    d.unmap(w.data_iova)
    d.kick()
    assert d.take_used()[-1] == (w.head, 1) and d.status(w) == BLK_IOERR
    assert disk(d, 0, 4096) == pattern(0, 4096, seed=1)
    [event] = events(d)
    assert (event.event_id, event.sid, event.address, event.rnw) == (
        EventId.F_TRANSLATION, SID, w.data_iova, True)
    counters = d.queue.counters()
    assert (counters["ioerrors"], counters["data_faults"], counters["writes"]) == (1, 1, 1)
    assert d.queue.error == 0  # the queue goes on
    ok = d.request(T_OUT, 0, data=pattern(0, 4096, seed=3))
    d.kick()
    assert d.status(ok) == BLK_OK


def test_a_read_into_a_read_only_mapping_is_a_permission_fault_on_a_write(d) -> None:
    r = d.request(T_IN, 0, in_len=4096, data_flags=READ)
    d.kick()
    assert d.status(r) == BLK_IOERR
    [event] = events(d)
    assert (event.event_id, event.address, event.rnw) == (EventId.F_PERMISSION,
                                                           r.data_iova, False)
    assert d.read(r.data_gpa, 16) == b"\xaa" * 16  # nothing written


def test_a_stage2_revoke_of_a_data_page_faults_with_s2_and_the_ipa(d) -> None:
    w = d.request(T_OUT, 0, data=pattern(0, 4096), publish=False)
    d.engine.s2_set_perm(w.data_gpa, PAGE, False, False)
    d.publish(w.head)
    d.kick()
    assert d.status(w) == BLK_IOERR
    [event] = events(d)
    assert (event.s2, event.ipa, event.address, event.rnw) == (True, w.data_gpa, w.data_iova,
                                                               True)
    d.engine.s2_reset()
    ok = d.request(T_OUT, 0, data=pattern(0, 4096))
    d.kick()
    assert d.status(ok) == BLK_OK


def test_a_header_that_does_not_translate_fails_the_request_only(d) -> None:
    w = d.request(T_OUT, 0, data=pattern(0, 512), publish=False)
    d.unmap(w.header_iova)
    d.publish(w.head)
    d.kick()
    assert d.status(w) == BLK_IOERR and d.queue.error == 0
    assert [e.event_id for e in events(d)] == [EventId.F_TRANSLATION]


# --- ring faults and forbidden chains: the queue stops --------------------------------------


def stopped(d: FakeBlkDriver, text: str) -> None:
    assert d.queue.error != 0
    assert text in d.queue.error_text()
    before = d.queue.counters()["requests"]
    d.request(T_OUT, 0, data=pattern(0, 512))
    assert d.kick() == 0 and d.queue.counters()["requests"] == before  # stays stopped


def test_an_unmapped_ring_stops_the_queue_and_reports_the_fault(d) -> None:
    d.request(T_OUT, 0, data=pattern(0, 512))
    d.unmap(d.ring_iova)
    assert d.kick() == 0
    [event] = events(d)
    assert (event.event_id, event.address, event.rnw) == (EventId.F_TRANSLATION,
                                                           d.used, False)
    stopped(d, "ring access did not translate")


def test_a_status_byte_that_does_not_translate_stops_the_queue(d) -> None:
    w = d.request(T_OUT, 0, data=pattern(0, 512))
    d.unmap(w.status_iova)
    d.kick()
    assert disk(d, 0, 512) == pattern(0, 512)  # the write was done; its status cannot be
    stopped(d, "ring access")


def test_reset_clears_a_stopped_queue(d) -> None:
    d.set_avail_idx(100)
    d.kick()
    assert d.queue.error
    d.queue.reset()
    assert d.queue.error == 0 and not d.queue.enabled


@pytest.mark.parametrize("build,why", [
    ("loop", "loops"),
    ("readable_after_writable", "readable descriptor after"),
    ("nested_indirect", "bad indirect"),
    ("indirect_with_next", "bad indirect"),
    ("indirect_bad_length", "bad indirect"),
    ("no_header", "without its 16-byte header"),
    ("no_status", "without a status byte"),
    ("bad_next", "next is outside"),
    ("bad_head", "head index"),
    ("avail_ahead", "avail index"),
])
def test_forbidden_chains_stop_the_queue(d, build: str, why: str) -> None:
    hdr = d.dma_map(d.alloc(16), 16, READ)
    st = d.dma_map(d.alloc(1), 1, WRITE)
    if build == "loop":
        d.set_desc(0, hdr, 16, F_NEXT, 1)
        d.set_desc(1, st, 1, F_WRITE | F_NEXT, 2)
        d.set_desc(2, st, 1, F_WRITE | F_NEXT, 1)
    elif build == "readable_after_writable":
        d.set_desc(0, st, 1, F_WRITE | F_NEXT, 1)
        d.set_desc(1, hdr, 16, 0)
    elif build in ("nested_indirect", "indirect_with_next", "indirect_bad_length"):
        table = d.alloc(32, align=16)
        inner = F_INDIRECT if build == "nested_indirect" else 0
        d.set_desc(0, hdr, 16, F_NEXT | inner, 1, table_gpa=table)
        d.set_desc(1, st, 1, F_WRITE, table_gpa=table)
        flags = F_INDIRECT | (F_NEXT if build == "indirect_with_next" else 0)
        length = 24 if build == "indirect_bad_length" else 32
        d.set_desc(0, d.dma_map(table, 32, READ), length, flags, 1)
    elif build == "no_header":
        d.set_desc(0, hdr, 8, F_NEXT, 1)
        d.set_desc(1, st, 1, F_WRITE)
    elif build == "no_status":
        d.set_desc(0, hdr, 16, 0)
    elif build == "bad_next":
        d.set_desc(0, hdr, 16, F_NEXT, 999)
    if build == "bad_head":
        d.publish(40)
    elif build == "avail_ahead":
        d.set_avail_idx(17)
    else:
        d.publish(0)
    d.kick()
    stopped(d, why)


def test_indirect_descriptors_need_the_feature(make) -> None:
    d = make(indirect=False)
    d.request(T_OUT, 0, data=pattern(0, 512), indirect=True)
    d.kick()
    stopped(d, "bad indirect")


def test_misaligned_rings_are_refused_at_enable(d) -> None:
    d.queue.reset()
    d.queue.set_ring(16, d.desc + 8, d.avail, d.used)
    assert not d.queue.enable() and "aligned" in d.queue.error_text()


# --- notifications ------------------------------------------------------------------------


def test_kicks_are_suppressed_only_while_serving_and_interrupts_follow_the_driver(d) -> None:
    d.request(T_OUT, 0, data=pattern(0, 512))
    d.kick()
    assert d.used_flags() == 0  # no VRING_USED_F_NO_NOTIFY left behind
    assert d.queue.take_interrupt() and not d.queue.take_interrupt()
    d.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT
    d.request(T_OUT, 0, data=pattern(0, 512))
    d.kick()
    assert not d.queue.take_interrupt()
    assert d.kick() == 0  # nothing new: no interrupt either
    assert not d.queue.take_interrupt()


def test_a_disabled_queue_serves_nothing(d) -> None:
    d.queue.reset()
    d.request(T_OUT, 0, data=pattern(0, 512))
    assert d.kick() == 0


def test_set_ring_refuses_sizes_that_are_not_powers_of_two(d) -> None:
    with pytest.raises(ValueError, match="power of 2"):
        d.queue.set_ring(100, d.desc, d.avail, d.used)
    with pytest.raises(ValueError, match="at most 20 bytes"):
        d.queue.set_backing(d.fd, 8, False, b"x" * 21)
