"""The virtio-blk requestq walker (ext/blkq.pxi, ext/blk_requests.pxi) restated in plain
Python, for the differential fuzz harness fuzz_blk_queue.py: the same split-ring walk
(virtio spec 2.7), the same chain rules (2.7.4.2, 2.7.5.3), the same request semantics
(5.2.6), over the same guest RAM, image file and translations.

Translations come from the engine's Python API (`Engine.translate`, itself fuzzed against
the reference walk by fuzz_pagetables.py): the oracle for one access; the walker's own
bookkeeping (what it reads, splits, copies, writes, completes, stops on) is the model's.
Mappings are whole pages, so a translation is good to the end of its page.
"""

from __future__ import annotations

import struct

PAGE = 4096
MASK64 = (1 << 64) - 1
READ, WRITE = 1, 2  # viommu._dataplane.READ / WRITE
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
MIN_CHAIN, MAX_IOV, MAX_FAULTS, MAX_DISCARD_SEG = 1024, 1024, 64, 16
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
BLK_OK, BLK_IOERR, BLK_UNSUPP = 0, 1, 2  # VIRTIO_BLK_S_*
(OK, RING_FAULT, AVAIL_AHEAD, BAD_HEAD, BAD_NEXT, LOOP, BAD_INDIRECT, R_AFTER_W, NO_HEADER,
 NO_STATUS, TOO_LONG, MISALIGNED) = range(12)


class Stop(Exception):
    """The queue stopped (error set)."""


class Model:
    """One BlkQueue's state and what serving does to RAM and the image."""

    def __init__(self, engine, sid: int, ram: bytearray, base: int, gpa: int,
                 image: bytearray, serial: bytes) -> None:
        self.engine, self.sid = engine, sid
        self.ram, self.base, self.gpa = ram, base, gpa  # guest RAM at ram[base:]
        self.image = image
        self.serial = serial.ljust(20, b"\0")
        self.num = 0
        self.desc = self.avail = self.used = 0
        self.last_avail = self.used_idx = 0
        self.enabled = False
        self.indirect = self.discard = self.write_zeroes = self.read_only = False
        self.error = OK
        self.faults: list[bytes] = []
        self.dropped = 0
        self.interrupt = False

    @property
    def capacity(self) -> int:
        return len(self.image) // 512

    # --- memory through translation ------------------------------------------------------

    def _host(self, iova: int, access: int) -> int | None:
        """RAM offset of iova for one access, or None with the fault noted."""
        gpa, record = self.engine.translate(self.sid, -1, iova & MASK64, 1, access)
        if gpa is None:
            if record is not None:
                if len(self.faults) < MAX_FAULTS:
                    self.faults.append(record)
                else:
                    self.dropped += 1
            return None
        return self.base + gpa - self.gpa

    def _stop(self, error: int) -> None:
        if self.error == OK:
            self.error = error
        raise Stop

    def ring_io(self, iova: int, data: bytearray | None, n: int) -> bytes:
        """Read n bytes (data None) or write `data`; a fault stops the queue (the pages
        before it are written)."""
        out, done = bytearray(), 0
        while done < n:
            where = self._host(iova + done, WRITE if data is not None else READ)
            if where is None:
                self._stop(RING_FAULT)
            chunk = min(PAGE - ((iova + done) & (PAGE - 1)), n - done)
            if data is not None:
                self.ram[where:where + chunk] = data[done:done + chunk]
            else:
                out += self.ram[where:where + chunk]
            done += chunk
        return bytes(out)

    # --- serving -------------------------------------------------------------------------------

    def serve(self) -> int:
        if not self.enabled or self.error != OK:
            return 0
        served, published = 0, self.used_idx
        try:
            self.ring_io(self.used, bytearray(b"\x01\x00"), 2)
            while self.error == OK:
                idx = self._avail_idx()
                if idx == self.last_avail:
                    self.ring_io(self.used, bytearray(2), 2)
                    idx = self._avail_idx()
                    if idx == self.last_avail:
                        break
                    self.ring_io(self.used, bytearray(b"\x01\x00"), 2)
                if (idx - self.last_avail) & 0xFFFF > self.num:
                    self._stop(AVAIL_AHEAD)
                try:
                    while self.last_avail != idx:
                        self._serve_one()
                        served += 1
                finally:
                    if self.used_idx != published:
                        self.ring_io(self.used + 2, bytearray(struct.pack("<H", self.used_idx)),
                                     2)
                        published = self.used_idx
        except Stop:
            pass
        if served:
            try:
                flags = struct.unpack("<H", self.ring_io(self.avail, None, 2))[0]
                if not flags & 1:
                    self.interrupt = True
            except Stop:
                pass
        return served

    def _avail_idx(self) -> int:
        return struct.unpack("<H", self.ring_io(self.avail + 2, None, 2))[0]

    def _serve_one(self) -> None:
        head = struct.unpack("<H", self.ring_io(
            self.avail + 4 + 2 * (self.last_avail % self.num), None, 2))[0]
        if head >= self.num:
            self._stop(BAD_HEAD)
        segs = self._gather(head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        readable = sum(n for _, n, w in segs if not w)
        writable = sum(n for _, n, w in segs if w)
        if readable < 16:
            self._stop(NO_HEADER)
        if writable == 0:
            self._stop(NO_STATUS)
        req = Request(self, segs, readable, writable)
        status = req.execute()
        addr, length, _ = segs[-1]
        self.ring_io(addr + length - 1, bytearray([status]), 1)
        elem = struct.pack("<II", head, (req.written + 1) & 0xFFFF_FFFF)
        self.ring_io(self.used + 4 + 8 * (self.used_idx % self.num), bytearray(elem), 8)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def _gather(self, head: int) -> list[tuple[int, int, bool]]:
        table, size, i, hops = self.desc, self.num, head, 0
        in_table = seen_writable = False
        max_chain = max(self.num, MIN_CHAIN)
        segs: list[tuple[int, int, bool]] = []
        total = 0
        while True:
            if hops >= max_chain:
                self._stop(LOOP)
            hops += 1
            addr, length, flags, nxt = struct.unpack(
                "<QIHH", self.ring_io((table + 16 * i) & MASK64, None, 16))
            if flags & F_INDIRECT:
                if (in_table or not self.indirect or flags & F_NEXT or length == 0
                        or length % 16 or length // 16 > max_chain):
                    self._stop(BAD_INDIRECT)
                table, size, i, in_table = addr, length // 16, 0, True
                continue
            if flags & F_WRITE:
                seen_writable = True
            elif seen_writable:
                self._stop(R_AFTER_W)
            if length:
                segs.append((addr, length, seen_writable))
                total += length
                if total > 0xFFFF_FFFF:
                    self._stop(TOO_LONG)
            if not flags & F_NEXT:
                return segs
            i = nxt
            if i >= size:
                self._stop(BAD_NEXT)


class Request:
    """One request's data movement (blk_requests.pxi's functions)."""

    def __init__(self, q: Model, segs, readable: int, writable: int) -> None:
        self.q, self.segs = q, segs
        self.readable, self.writable = readable, writable
        self.written = 0

    def _pieces(self, writable: bool, pos: int, n: int):
        """(iova, length) pieces of a stream from `pos`, split at page ends."""
        for addr, length, w in self.segs:
            if w != writable:
                continue
            if pos >= length:
                pos -= length
                continue
            off = pos
            pos = 0
            while off < length and n:
                chunk = min(PAGE - ((addr + off) & (PAGE - 1)), length - off, n)
                yield (addr + off) & MASK64, chunk
                off += chunk
                n -= chunk
            if not n:
                return

    def copy(self, writable: bool, pos: int, data: bytes | None, n: int) -> bytes | None:
        """Into the writable stream (`data`), or out of the readable one; None on a fault."""
        out, done = bytearray(), 0
        for iova, chunk in self._pieces(writable, pos, n):
            where = self.q._host(iova, WRITE if writable else READ)
            if where is None:
                return None
            if writable:
                self.q.ram[where:where + chunk] = data[done:done + chunk]
                self.written += chunk
            else:
                out += self.q.ram[where:where + chunk]
            done += chunk
        return bytes(out)

    def transfer(self, to_file: bool, pos: int, n: int, file_pos: int) -> bool:
        """MAX_IOV pages translated before the file is touched; False on a fault."""
        batch: list[tuple[int, int]] = []
        done = 0
        for iova, chunk in self._pieces(not to_file, pos, n):
            where = self.q._host(iova, READ if to_file else WRITE)
            if where is None:
                return False
            batch.append((where, chunk))
            done += chunk
            if len(batch) == MAX_IOV or done == n:
                at = file_pos + done - sum(c for _, c in batch)
                for where, chunk in batch:
                    if to_file:
                        self.q.image[at:at + chunk] = self.q.ram[where:where + chunk]
                    else:
                        self.q.ram[where:where + chunk] = self.q.image[at:at + chunk]
                        self.written += chunk
                    at += chunk
                batch = []
        return True

    def range_ok(self, sector: int, nbytes: int) -> bool:
        cap = self.q.capacity
        return nbytes % 512 == 0 and sector <= cap and nbytes // 512 <= cap - sector

    def execute(self) -> int:
        header = self.copy(False, 0, None, 16)
        if header is None:
            return BLK_IOERR
        kind, _ioprio, sector = struct.unpack("<IIQ", header)
        q = self.q
        if kind in (T_IN, T_OUT):
            out = kind == T_OUT
            n = self.readable - 16 if out else self.writable - 1
            if out and q.read_only or not self.range_ok(sector, n):
                return BLK_IOERR
            ok = self.transfer(out, 16 if out else 0, n, sector * 512)
            return BLK_OK if ok else BLK_IOERR
        if kind == T_FLUSH:
            return BLK_OK
        if kind == T_GET_ID:
            n = min(self.writable - 1, 20)
            if n and self.copy(True, 0, q.serial, n) is None:
                return BLK_IOERR
            return BLK_OK
        if kind == T_DISCARD and q.discard or kind == T_WRITE_ZEROES and q.write_zeroes:
            return self.discard(kind == T_WRITE_ZEROES)
        return BLK_UNSUPP

    def discard(self, zeroes: bool) -> int:
        n = self.readable - 16
        if self.q.read_only or n == 0 or n % 16 or n > 16 * MAX_DISCARD_SEG:
            return BLK_IOERR
        raw = self.copy(False, 16, None, n)
        if raw is None:
            return BLK_IOERR
        segs = [struct.unpack_from("<QII", raw, k) for k in range(0, n, 16)]
        for sector, count, flags in segs:
            if flags & ~1 or (not zeroes and flags):
                return BLK_UNSUPP
            if not self.range_ok(sector, count * 512):
                return BLK_IOERR
        for sector, count, _ in segs:
            self.q.image[sector * 512:(sector + count) * 512] = bytes(count * 512)
        return BLK_OK
