# Split virtqueues (virtio spec 2.7) whose rings and buffers live in guest memory, through
# the ring layouts of uapi/virtio_ring.pxd. Everything the driver controls (indices,
# descriptors, addresses, lengths) is read once and checked against the memory table
# before it is used: a malformed chain is returned with used length 0.


class RingError(Exception):
    """The driver broke the ring itself (bad head index or avail index); the device needs reset."""


cdef enum RingErrorKind:
    RING_OK = 0
    RING_AVAIL_AHEAD = 1
    RING_BAD_HEAD = 2


cdef inline size_t vring_avail_size(unsigned int num) noexcept nogil:
    # flags, idx, ring[num], used_event
    return sizeof(vring_avail) + num * sizeof(uint16_t) + sizeof(uint16_t)

cdef inline size_t vring_used_size(unsigned int num) noexcept nogil:
    # flags, idx, ring[num], avail_event
    return sizeof(vring_used) + num * sizeof(vring_used_elem) + sizeof(uint16_t)


cdef class VirtQueue:
    """One split virtqueue whose rings and buffers live in guest memory."""

    cdef GuestMemory mem
    cdef readonly int index
    cdef readonly unsigned int num
    cdef readonly uint64_t desc_uaddr, avail_uaddr, used_uaddr
    cdef vring_desc *desc
    cdef vring_avail *avail
    cdef vring_used *used
    cdef readonly uint16_t last_avail
    cdef readonly uint16_t used_idx
    cdef readonly bint started
    # counters the control API reports
    cdef readonly uint64_t chains_seen
    cdef readonly uint64_t chains_malformed
    cdef readonly uint64_t buffers_too_small
    # the chain being decoded
    cdef uint8_t **seg_ptr
    cdef uint32_t *seg_len
    cdef uint8_t *seg_write
    cdef unsigned int nseg
    # a chain the request thread popped but could not serve (`_keep_pending`)
    cdef bint has_pending
    cdef uint16_t pending_head
    cdef int ring_error
    cdef uint32_t ring_error_value

    def __cinit__(self, GuestMemory mem not None, int index):
        self.mem = mem
        self.index = index
        self.num = 0
        self.seg_ptr = NULL
        self.seg_len = NULL
        self.seg_write = NULL

    def __dealloc__(self):
        self._free_segments()

    cdef void _free_segments(self):
        free(self.seg_ptr)
        free(self.seg_len)
        free(self.seg_write)
        self.seg_ptr = NULL
        self.seg_len = NULL
        self.seg_write = NULL

    def set_num(self, unsigned int num):
        if num == 0 or num > VIRTQUEUE_MAX_SIZE or (num & (num - 1)) != 0:
            raise ValueError(f"virtqueue size {num} is not a power of 2 in 1..{VIRTQUEUE_MAX_SIZE}")
        self._free_segments()
        self.seg_ptr = <uint8_t **>malloc(num * sizeof(uint8_t *))
        self.seg_len = <uint32_t *>malloc(num * sizeof(uint32_t))
        self.seg_write = <uint8_t *>malloc(num)
        if self.seg_ptr == NULL or self.seg_len == NULL or self.seg_write == NULL:
            self._free_segments()
            raise MemoryError()
        self.num = num
        self.started = False
        self.has_pending = False

    def set_addr(self, uint64_t desc, uint64_t avail, uint64_t used):
        """Ring addresses are front-end virtual addresses (vhost-user SET_VRING_ADDR)."""
        self.desc_uaddr, self.avail_uaddr, self.used_uaddr = desc, avail, used
        self.started = False

    def set_base(self, uint16_t base):
        self.last_avail = base
        self.used_idx = base

    def start(self):
        """Resolve ring addresses through the memory table; call again after it changes."""
        if self.num == 0:
            raise ValueError(f"virtqueue {self.index}: size not set")
        if (self.desc_uaddr % VRING_DESC_ALIGN_SIZE or self.avail_uaddr % VRING_AVAIL_ALIGN_SIZE
                or self.used_uaddr % VRING_USED_ALIGN_SIZE):
            raise ValueError(f"virtqueue {self.index}: misaligned ring address")
        self.desc = <vring_desc *>self.mem.uaddr_ptr(self.desc_uaddr,
                                                     sizeof(vring_desc) * self.num)
        self.avail = <vring_avail *>self.mem.uaddr_ptr(self.avail_uaddr,
                                                       vring_avail_size(self.num))
        self.used = <vring_used *>self.mem.uaddr_ptr(self.used_uaddr, vring_used_size(self.num))
        if self.desc == NULL or self.avail == NULL or self.used == NULL:
            self.started = False
            raise ValueError(f"virtqueue {self.index}: ring outside the memory table")
        self.ring_error = RING_OK
        self.started = True

    def stop(self):
        if self.has_pending:  # popped but never answered: back to the driver's ring
            self.has_pending = False
            self.last_avail -= 1
            self.chains_seen -= 1
        self.started = False
        self.desc = NULL
        self.avail = NULL
        self.used = NULL

    def avail_pending(self) -> int:
        """Buffers the driver made available that the device has not consumed yet."""
        return self._avail_pending()

    def needs_interrupt(self) -> bool:
        """The driver wants used-buffer notifications (VIRTIO_F_EVENT_IDX is not offered)."""
        return self._needs_interrupt()

    cdef bint _needs_interrupt(self) noexcept nogil:
        if not self.started:
            return False
        viommu_mb()
        return (viommu_load16(&self.avail.flags) & VRING_AVAIL_F_NO_INTERRUPT) == 0

    cdef uint16_t _avail_pending(self) noexcept nogil:
        if not self.started:
            return 0
        return <uint16_t>(viommu_load16(&self.avail.idx) - self.last_avail)

    cdef void _suppress_kicks(self, bint suppress) noexcept nogil:
        """VRING_USED_F_NO_NOTIFY: the device is polling, the driver need not kick. Without
        VIRTIO_F_EVENT_IDX the driver reads this flag before every kick (spec 2.7.10)."""
        if self.started:
            viommu_store16(&self.used.flags, VRING_USED_F_NO_NOTIFY if suppress else 0)
            viommu_mb()

    @property
    def kicks_suppressed(self) -> bool:
        return self.started and (viommu_load16(&self.used.flags) & VRING_USED_F_NO_NOTIFY) != 0

    cdef int _pop_chain(self, uint16_t *head_out) noexcept nogil:
        """Take the next chain into the segment arrays, without the GIL.

        Returns 1 for a valid chain, 0 when the ring is empty, -1 for a malformed chain
        whose head can still be returned with used length 0, and -2 when the ring itself
        is corrupt (`ring_error` says how; `_pop` turns it into RingError).
        """
        cdef uint16_t avail_idx, head
        cdef unsigned int i, count = 0
        cdef bint seen_writable = False
        cdef vring_desc d
        cdef uint8_t *p
        if not self.started:
            return 0
        if self.ring_error != RING_OK:  # stays broken until the ring restarts
            return -2
        if self.has_pending:  # a chain popped by the request thread, left for Python
            self.has_pending = False
            head_out[0] = self.pending_head
            return 1
        avail_idx = viommu_load16(&self.avail.idx)
        if avail_idx == self.last_avail:
            return 0
        if <uint16_t>(avail_idx - self.last_avail) > self.num:
            self.ring_error = RING_AVAIL_AHEAD
            self.ring_error_value = avail_idx
            return -2
        viommu_mb()
        head = rd16(<const uint8_t *>&self.avail.ring[self.last_avail % self.num])
        self.last_avail += 1
        if head >= self.num:
            self.ring_error = RING_BAD_HEAD
            self.ring_error_value = head
            return -2
        head_out[0] = head
        self.chains_seen += 1
        self.nseg = 0
        i = head
        while True:
            if count >= self.num:
                self.chains_malformed += 1
                return -1  # loop in the descriptor chain
            count += 1
            memcpy(&d, &self.desc[i], sizeof(vring_desc))  # once: the driver may change it
            if d.flags & VRING_DESC_F_INDIRECT:
                self.chains_malformed += 1
                return -1  # VIRTIO_RING_F_INDIRECT_DESC is not offered
            if d.flags & VRING_DESC_F_WRITE:
                seen_writable = True
            elif seen_writable:
                self.chains_malformed += 1
                return -1  # readable descriptor after a writable one
            if d.len:
                p = self.mem.gpa_ptr(d.addr, d.len)
                if p == NULL:
                    self.chains_malformed += 1
                    return -1
                self.seg_ptr[self.nseg] = p
                self.seg_len[self.nseg] = d.len
                self.seg_write[self.nseg] = 1 if d.flags & VRING_DESC_F_WRITE else 0
                self.nseg += 1
            if not d.flags & VRING_DESC_F_NEXT:
                return 1
            i = d.next
            if i >= self.num:
                self.chains_malformed += 1
                return -1

    cdef void _keep_pending(self, uint16_t head) noexcept nogil:
        """Leave the chain just popped (still in the segment arrays) for the next `_pop`."""
        self.pending_head = head
        self.has_pending = True

    cdef int _pop(self, uint16_t *head_out) except -3:
        """`_pop_chain`, raising RingError when the driver broke the ring."""
        cdef int rc = self._pop_chain(head_out)
        if rc == -2:
            raise RingError(self.ring_error_text())
        return rc

    def ring_error_text(self) -> str:
        if self.ring_error == RING_AVAIL_AHEAD:
            return (f"virtqueue {self.index}: avail index {self.ring_error_value} is more "
                    f"than {self.num} ahead of {self.last_avail}")
        if self.ring_error == RING_BAD_HEAD:
            return (f"virtqueue {self.index}: head index {self.ring_error_value} >= size "
                    f"{self.num}")
        return ""

    cdef void _add_used(self, uint16_t head, uint32_t length) noexcept nogil:
        """Fill the next used element; the driver sees it at `_publish_used`."""
        cdef vring_used_elem elem
        elem.id = head
        elem.len = length
        memcpy(&self.used.ring[self.used_idx % self.num], &elem, sizeof(vring_used_elem))
        self.used_idx += 1

    cdef void _publish_used(self) noexcept nogil:
        viommu_mb()  # the elements before the index that reveals them
        viommu_store16(&self.used.idx, self.used_idx)

    cdef void _push_used(self, uint16_t head, uint32_t length) noexcept nogil:
        self._add_used(head, length)
        self._publish_used()

    def push_used(self, uint16_t head, uint32_t length):
        if not self.started:
            raise ValueError(f"virtqueue {self.index} is not started")
        self._push_used(head, length)

    def process_requests(self, handler) -> int:
        """Serve every available virtio-iommu request; returns the number of used buffers.

        `handler(request)` returns `(status, payload)` to complete the request (payload is
        written before the tail: PROBE properties, else b""), or None to return the buffers
        unwritten with used length 0 (the spec's answer to a request it cannot serve).
        """
        cdef uint16_t head
        cdef int rc
        cdef int pushed = 0
        cdef Request req
        while True:
            rc = self._pop(&head)
            if rc == 0:
                return pushed
            pushed += 1
            if rc < 0:
                self._push_used(head, 0)
                continue
            req = _parse_request(self, head)
            if req is None:
                self._push_used(head, 0)
                continue
            try:
                result = handler(req)
            except BaseException:
                self._push_used(head, 0)  # never leave the spinning driver without an answer
                raise
            if result is None:
                self._push_used(head, 0)
                continue
            status, payload = result
            self._push_used(head, req._complete(status, payload))

    def push_event(self, const uint8_t[::1] record not None) -> bool:
        """Write one fault record into the next driver-posted buffer (`_push_record`).
        Returns False when the driver has posted no buffer."""
        cdef int rc = self._push_record(&record[0] if record.shape[0] else NULL,
                                        record.shape[0])
        if rc == -2:
            raise RingError(self.ring_error_text())
        return rc == 1

    cdef int _push_record(self, const uint8_t *record, uint32_t n) noexcept nogil:
        """Write one fault record into the next driver-posted buffer and publish it.
        1: written; 0: the driver has posted no buffer; -2: the ring is broken
        (`ring_error`). A buffer that is malformed or too small for the record is returned
        with used length 0 (the spec forbids splitting a record across buffers) and the
        next one is tried."""
        cdef uint16_t head
        cdef int rc
        cdef unsigned int k
        cdef uint64_t room
        cdef uint32_t done, chunk
        while True:
            rc = self._pop_chain(&head)
            if rc == 0 or rc == -2:
                return rc
            if rc < 0:
                self._push_used(head, 0)
                continue
            room = 0
            for k in range(self.nseg):
                if not self.seg_write[k]:
                    room = 0
                    break
                room += self.seg_len[k]
            if room < n:
                self.buffers_too_small += 1
                self._push_used(head, 0)
                continue
            done = 0
            k = 0
            while done < n:
                chunk = min(self.seg_len[k], n - done)
                memcpy(self.seg_ptr[k], record + done, chunk)
                done += chunk
                k += 1
            self._push_used(head, n)
            return 1
