# The requestq of a virtio-blk endpoint (virtio spec 2.7 "Split Virtqueues", 5.2 "Block
# Device"), walked in C. Because the device offers VIRTIO_F_ACCESS_PLATFORM, every address
# the driver gives it is an IOVA (spec 6.1: "the device ... accesses memory through an
# IOMMU"): the ring addresses from the common configuration, each descriptor's `addr` and
# indirect tables. Every access here goes through `Engine.translate_c` with the endpoint's
# stream ID (its requester ID), split at each page and mapping end, and nothing caches a
# ring pointer outside the engine's IOTLB, so an UNMAP or a stage-2 change is seen at once.
#
# Faults:
# - on a request's data or header: the request completes with VIRTIO_BLK_S_IOERR and the
#   SMMUv3 event waits in `take_faults()` for the relay (blk_requests.pxi);
# - on the avail or used ring, the descriptor table, an indirect table or the status byte,
#   and for a chain the spec forbids (loops, a readable buffer after a writable one, nested
#   or chained indirect descriptors, no header or status): the queue stops with `error`
#   set, and the device sets DEVICE_NEEDS_RESET (spec 2.1.2) until the driver resets it, as
#   QEMU's virtio_error() does; the event of a ring fault goes to the relay too.
#
# Notifications: while serving, the used ring carries VRING_USED_F_NO_NOTIFY, so a driver
# adding requests meanwhile does not kick; before it returns, the queue clears the flag and
# looks at the avail index once more (spec 2.7.10; without VIRTIO_F_EVENT_IDX the driver
# reads the flag after publishing). It asks for an interrupt unless the driver set
# VRING_AVAIL_F_NO_INTERRUPT.
#
# Serving releases the GIL; the caller holds the data-plane lock (the backend's loop does
# whenever it runs), so MAP/UNMAP served by the request thread never race a walk.


cdef enum:
    BLKQ_MIN_CHAIN = 1024           # descriptors a chain may use (the queue size if larger)
    BLKQ_MAX_CHAIN_BYTES = 0xFFFFFFFF   # spec 2.7.5: "no longer than 2^32 bytes in total"

cdef enum BlkqError:
    BLKQ_OK = 0
    BLKQ_RING_FAULT = 1             # a ring, descriptor or status access did not translate
    BLKQ_AVAIL_AHEAD = 2
    BLKQ_BAD_HEAD = 3
    BLKQ_BAD_NEXT = 4
    BLKQ_LOOP = 5
    BLKQ_BAD_INDIRECT = 6
    BLKQ_READABLE_AFTER_WRITABLE = 7
    BLKQ_NO_HEADER = 8
    BLKQ_NO_STATUS = 9
    BLKQ_TOO_LONG = 10
    BLKQ_MISALIGNED = 11

BLKQ_ERRORS = {
    BLKQ_RING_FAULT: "a ring access did not translate",
    BLKQ_AVAIL_AHEAD: "the avail index is more than the queue size ahead",
    BLKQ_BAD_HEAD: "a head index is not below the queue size",
    BLKQ_BAD_NEXT: "a descriptor's next is outside its table",
    BLKQ_LOOP: "a descriptor chain loops (longer than the queue allows)",
    BLKQ_BAD_INDIRECT: "a bad indirect descriptor (not negotiated, nested, with NEXT, "
                       "or a table length that is not a non-zero multiple of 16)",
    BLKQ_READABLE_AFTER_WRITABLE: "a device-readable descriptor after a device-writable one",
    BLKQ_NO_HEADER: "a request without its 16-byte header",
    BLKQ_NO_STATUS: "a request without a status byte",
    BLKQ_TOO_LONG: "a chain longer than 2^32 bytes",
    BLKQ_MISALIGNED: "a ring address is not aligned as the spec requires",
}


cdef class BlkQueue:
    """The block device's requestq: Python configures it (`set_backing`, `set_features`,
    `set_ring`, `enable`, `reset`) from the common configuration, calls `serve(engine)` on
    each kick, and relays `take_faults()`. See the top of blkq.pxi."""

    cdef readonly uint32_t sid
    cdef readonly unsigned int num
    cdef readonly uint64_t desc, avail, used
    cdef readonly uint16_t last_avail, used_idx
    cdef readonly bint enabled
    cdef bint indirect
    cdef unsigned int max_chain
    cdef BlkDevice dev
    cdef BlkChain ch
    cdef BlkFaults faults
    cdef iovec *iov
    cdef readonly int error
    cdef readonly uint64_t error_value
    cdef bint interrupt
    cdef readonly uint64_t serves, interrupts_wanted

    def __cinit__(self, uint32_t sid):
        self.sid = sid
        self.dev.fd = -1
        self.iov = <iovec *>malloc(BLK_MAX_IOV * sizeof(iovec))
        if self.iov == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.iov)
        free(self.ch.segs)

    # --- configuration (Python, holding the data-plane lock) ----------------------------

    def set_backing(self, int fd, uint64_t capacity, bint read_only, bytes serial) -> None:
        """The backing file (the caller keeps it open), its size in 512-byte sectors, and
        the GET_ID string (up to 20 bytes, NUL-padded)."""
        if len(serial) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"a virtio-blk serial is at most {VIRTIO_BLK_ID_BYTES} bytes")
        self.dev.fd = fd
        self.dev.capacity = capacity
        self.dev.read_only = read_only
        memset(self.dev.serial, 0, VIRTIO_BLK_ID_BYTES)
        memcpy(self.dev.serial, <const char *>serial, len(serial))

    def set_features(self, bint indirect, bint discard, bint write_zeroes) -> None:
        """What the driver accepted: VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES. (With `bint` defaults here, Cython 3.3.1 once converted
        the inferred `fd` of RequestServer's `for fd in (kick_fd, stop_fd)` as a bint, and
        the request thread's epoll waited on fd 1: the fd loops of the queue threads now
        declare `cdef int fd`, and this method keeps no defaults.)"""
        self.indirect = indirect
        self.dev.discard = discard
        self.dev.write_zeroes = write_zeroes

    def set_ring(self, unsigned int num, uint64_t desc, uint64_t avail, uint64_t used) -> None:
        """Queue size and the three ring IOVAs (queue_desc, queue_driver, queue_device)."""
        cdef BlkSeg *segs
        if num == 0 or num > VIRTQUEUE_MAX_SIZE or num & (num - 1):
            raise ValueError(f"queue size {num} is not a power of 2 in 1..{VIRTQUEUE_MAX_SIZE}")
        self.max_chain = max(num, <unsigned int>BLKQ_MIN_CHAIN)
        segs = <BlkSeg *>realloc(self.ch.segs, self.max_chain * sizeof(BlkSeg))
        if segs == NULL:
            raise MemoryError()
        self.ch.segs = segs
        self.num, self.desc, self.avail, self.used = num, desc, avail, used

    def enable(self) -> bool:
        """queue_enable = 1: serve from index 0. False (and `error` set) when a ring
        address is misaligned (spec 2.7 "Virtqueue Alignment")."""
        if self.num == 0:
            raise ValueError("queue size and addresses first (set_ring)")
        self.last_avail = self.used_idx = 0
        self.enabled = True
        if (self.desc % VRING_DESC_ALIGN_SIZE or self.avail % VRING_AVAIL_ALIGN_SIZE
                or self.used % VRING_USED_ALIGN_SIZE):
            self.error = BLKQ_MISALIGNED
            return False
        return True

    def reset(self) -> None:
        """Device reset: disabled, indices and error cleared (the counters stay)."""
        self.enabled = False
        self.last_avail = self.used_idx = 0
        self.error = BLKQ_OK
        self.error_value = 0
        self.interrupt = False
        self.faults.n = 0
        self.faults.dropped = 0

    # --- serving --------------------------------------------------------------------------

    def serve(self, Engine engine not None) -> int:
        """Serve every available request without the GIL; the number completed. Then see
        `error`, `take_faults()` and `take_interrupt()`."""
        cdef int served
        with nogil:
            served = self._serve(engine)
        return served

    def take_interrupt(self) -> bool:
        """Whether the driver is owed a used-buffer notification since the last call."""
        wanted, self.interrupt = self.interrupt, False
        return wanted

    def take_faults(self) -> tuple:
        """(SMMUv3 event records of the faults since the last call, how many were dropped
        because more than BLK_MAX_FAULTS waited)."""
        records = [fault_record(&self.faults.f[i]) for i in range(self.faults.n)]
        dropped = self.faults.dropped
        self.faults.n = 0
        self.faults.dropped = 0
        return records, dropped

    def error_text(self) -> str:
        if self.error == BLKQ_OK:
            return ""
        return f"{BLKQ_ERRORS[self.error]} ({self.error_value:#x})"

    @property
    def host_errno(self) -> int:
        """errno of the backing file's last failed read, write or sync (0: none yet)."""
        return self.dev.last_errno

    def counters(self) -> dict:
        cdef BlkCounters *c = &self.dev.c
        return {"requests": c.requests, "reads": c.reads, "writes": c.writes,
                "flushes": c.flushes, "get_ids": c.get_ids, "discards": c.discards,
                "write_zeroes": c.write_zeroes, "unsupported": c.unsupported,
                "ioerrors": c.ioerrors, "data_faults": c.data_faults,
                "host_errors": c.host_errors, "bytes_read": c.bytes_read,
                "bytes_written": c.bytes_written, "serves": self.serves,
                "interrupts": self.interrupts_wanted}

    # --- the walk (no GIL) ------------------------------------------------------------------

    cdef int _stop(self, int error, uint64_t value) noexcept nogil:
        if self.error == BLKQ_OK:
            self.error = error
            self.error_value = value
        return -1

    cdef int _ring_io(self, Engine e, uint64_t iova, uint8_t *buf, uint64_t n,
                      bint write) noexcept nogil:
        """Copy between `buf` and ring memory at `iova`, page by page; a fault stops the
        queue (BLKQ_RING_FAULT) and its event goes to the relay."""
        cdef uint64_t gpa, avail, chunk, done = 0
        cdef uint8_t *host
        cdef Fault f
        while done < n:
            host = e.translate_c(self.sid, -1, iova + done, ACC_WRITE if write else ACC_READ,
                                 &gpa, &avail, &f)
            if host == NULL:
                blk_note_fault(&self.faults, &f)
                return self._stop(BLKQ_RING_FAULT, iova + done)
            chunk = min(avail, n - done)
            if write:
                memcpy(host, buf + done, chunk)
            else:
                memcpy(buf + done, host, chunk)
            done += chunk
        return 0

    cdef uint8_t *_ring_word(self, Engine e, uint64_t iova, bint write) noexcept nogil:
        """Host address of an aligned 16-bit ring word (it never straddles a page)."""
        cdef uint64_t gpa, avail
        cdef Fault f
        cdef uint8_t *host = e.translate_c(self.sid, -1, iova, ACC_WRITE if write else ACC_READ,
                                           &gpa, &avail, &f)
        if host == NULL:
            blk_note_fault(&self.faults, &f)
            self._stop(BLKQ_RING_FAULT, iova)
        return host

    cdef int _set_used_flags(self, Engine e, uint16_t flags) noexcept nogil:
        cdef uint8_t *p = self._ring_word(e, self.used, True)
        if p == NULL:
            return -1
        viommu_store16(p, flags)
        viommu_mb()
        return 0

    cdef int _avail_idx(self, Engine e, uint16_t *idx) noexcept nogil:
        cdef uint8_t *p = self._ring_word(e, self.avail + 2, False)
        if p == NULL:
            return -1
        idx[0] = viommu_load16(p)
        return 0

    cdef int _serve(self, Engine e) noexcept nogil:
        cdef int served = 0
        cdef uint16_t idx, published = self.used_idx
        cdef uint8_t *p
        if not self.enabled or self.error != BLKQ_OK:
            return 0
        self.serves += 1
        if self._set_used_flags(e, VRING_USED_F_NO_NOTIFY) != 0:
            return 0
        while self.error == BLKQ_OK:
            if self._avail_idx(e, &idx) != 0:
                break
            if idx == self.last_avail:
                # Going idle: kicks back on, then look once more, or a request published
                # just before the flag cleared would wait for the next kick.
                if self._set_used_flags(e, 0) != 0 or self._avail_idx(e, &idx) != 0:
                    break
                if idx == self.last_avail or self._set_used_flags(
                        e, VRING_USED_F_NO_NOTIFY) != 0:
                    break
            if <uint16_t>(idx - self.last_avail) > self.num:
                self._stop(BLKQ_AVAIL_AHEAD, idx)
                break
            while self.last_avail != idx and self._serve_one(e) == 0:
                served += 1
            if self.used_idx != published:
                p = self._ring_word(e, self.used + 2, True)
                if p == NULL:
                    break
                viommu_mb()  # the used elements before the index that reveals them
                viommu_store16(p, self.used_idx)
                published = self.used_idx
        if served:
            viommu_mb()
            p = self._ring_word(e, self.avail, False)
            if p != NULL and not viommu_load16(p) & VRING_AVAIL_F_NO_INTERRUPT:
                self.interrupt = True
                self.interrupts_wanted += 1
        return served

    cdef int _serve_one(self, Engine e) noexcept nogil:
        """Pop, serve and complete one request; -1 when the queue stopped."""
        cdef uint16_t head
        cdef uint8_t status
        cdef vring_used_elem elem
        cdef BlkSeg *last
        if self._ring_io(e, self.avail + 4 + 2 * (self.last_avail % self.num),
                         <uint8_t *>&head, 2, False) != 0:
            return -1
        if head >= self.num:
            return self._stop(BLKQ_BAD_HEAD, head)
        if self._gather(e, head) != 0:
            return -1
        self.last_avail += 1
        if self.ch.readable < sizeof(virtio_blk_outhdr):
            return self._stop(BLKQ_NO_HEADER, head)
        if self.ch.writable == 0:
            return self._stop(BLKQ_NO_STATUS, head)
        self.ch.written = 0
        self.ch.faulted = False
        status = blk_execute(e, self.sid, &self.dev, &self.ch, &self.faults, self.iov)
        if self.ch.faulted:
            self.dev.c.data_faults += 1
        if status == VIRTIO_BLK_S_IOERR:
            self.dev.c.ioerrors += 1
        # The status byte is the last writable byte; Linux would read a stale one if it
        # were not written, so a fault here stops the queue.
        last = &self.ch.segs[self.ch.nseg - 1]
        if self._ring_io(e, last.addr + last.len - 1, &status, 1, True) != 0:
            return -1
        elem.id = head
        elem.len = <uint32_t>(self.ch.written + 1)
        if self._ring_io(e, self.used + 4 + 8 * (self.used_idx % self.num),
                         <uint8_t *>&elem, sizeof(elem), True) != 0:
            return -1
        self.used_idx += 1
        return 0

    cdef int _gather(self, Engine e, uint16_t head) noexcept nogil:
        """The chain from `head` into `ch`: readable segments, then writable ones."""
        cdef BlkChain *ch = &self.ch
        cdef uint64_t table = self.desc
        cdef unsigned int size = self.num, i = head, hops = 0
        cdef bint in_table = False, seen_writable = False
        cdef vring_desc d
        ch.nseg = ch.nread = 0
        ch.readable = ch.writable = 0
        while True:
            if hops >= self.max_chain:
                return self._stop(BLKQ_LOOP, head)
            hops += 1
            if self._ring_io(e, table + 16 * <uint64_t>i, <uint8_t *>&d, sizeof(d), False):
                return -1
            if d.flags & VRING_DESC_F_INDIRECT:
                # spec 2.7.5.3.1: negotiated, one table per chain, not with NEXT; its WRITE
                # flag is ignored (2.7.5.3.2)
                if (in_table or not self.indirect or d.flags & VRING_DESC_F_NEXT
                        or d.len == 0 or d.len % sizeof(vring_desc)
                        or d.len // sizeof(vring_desc) > self.max_chain):
                    return self._stop(BLKQ_BAD_INDIRECT, head)
                table, size, i, in_table = d.addr, d.len // sizeof(vring_desc), 0, True
                continue
            if d.flags & VRING_DESC_F_WRITE:
                seen_writable = True
            elif seen_writable:
                return self._stop(BLKQ_READABLE_AFTER_WRITABLE, head)
            if d.len:
                ch.segs[ch.nseg].addr = d.addr
                ch.segs[ch.nseg].len = d.len
                ch.nseg += 1
                if seen_writable:
                    ch.writable += d.len
                else:
                    ch.nread += 1
                    ch.readable += d.len
                if ch.readable + ch.writable > BLKQ_MAX_CHAIN_BYTES:
                    return self._stop(BLKQ_TOO_LONG, head)
            if not d.flags & VRING_DESC_F_NEXT:
                return 0
            i = d.next
            if i >= size:
                return self._stop(BLKQ_BAD_NEXT, head)
