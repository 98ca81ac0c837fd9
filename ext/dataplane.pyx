# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""viommu data plane: guest memory, split virtqueues and virtio-iommu request parsing.

Everything the guest controls (ring indices, descriptors, addresses, lengths) is read once
and checked against the vhost-user memory table before it is used: a malformed chain is
returned with used length 0 and never makes the backend touch memory outside guest RAM.

Layouts: virtio 1.x split virtqueue (spec 2.7) and virtio-iommu requests (spec 5.13.6).
The host is assumed little-endian, as are virtio 1.x rings and virtio-iommu structures.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset


cdef extern from "barrier.h":
    void viommu_mb() nogil
    uint16_t viommu_load16(const void *p) nogil
    void viommu_store16(void *p, uint16_t v) nogil
    int viommu_load_flag(const int *p) nogil
    void viommu_store_flag(int *p, int v) nogil
    void viommu_cpu_relax() nogil


# --- virtio split ring (virtio spec 2.7) ---------------------------------------------------
cdef enum:
    VRING_DESC_F_NEXT = 1
    VRING_DESC_F_WRITE = 2
    VRING_DESC_F_INDIRECT = 4
    VRING_AVAIL_F_NO_INTERRUPT = 1
    VRING_USED_F_NO_NOTIFY = 1
    VRING_DESC_SIZE = 16
    VIRTQUEUE_MAX_SIZE = 32768


# --- virtio-iommu request types and sizes (virtio spec 5.13.6) -----------------------------
cpdef enum RequestType:
    VIRTIO_IOMMU_T_ATTACH = 1
    VIRTIO_IOMMU_T_DETACH = 2
    VIRTIO_IOMMU_T_MAP = 3
    VIRTIO_IOMMU_T_UNMAP = 4
    VIRTIO_IOMMU_T_PROBE = 5
    # Page-table extension (unmerged draft, digest §B.4 "DX"), under viommu's private
    # feature bit: bind SMMUv3 STE words, invalidate cached translations.
    VIRTIO_IOMMU_T_ATTACH_TABLE = 6
    VIRTIO_IOMMU_T_INVALIDATE = 7
    # Answer to a page request (R21 with the maintainer's review: no domain), under viommu's
    # private VIOMMU_F_PAGE_REQUEST.
    VIRTIO_IOMMU_T_PAGE_RESP = 8

# Device-readable size of each request (head + body); the tail is device-writable.
cdef enum:
    REQ_HEAD_SIZE = 4
    REQ_TAIL_SIZE = 4
    ATTACH_READABLE = 20
    DETACH_READABLE = 20
    MAP_READABLE = 36
    UNMAP_READABLE = 28
    PROBE_READABLE = 72
    ATTACH_TABLE_READABLE = 124
    INVALIDATE_READABLE = 60
    PAGE_RESP_READABLE = 24
    MAX_READABLE = 124
    MAX_WRITABLE_SEGMENTS = 8
    MAX_REGIONS = 32

# A request whose writable part is larger than this cannot be a virtio-iommu request.
cdef enum:
    MAX_WRITABLE_LEN = 65536 + REQ_TAIL_SIZE


cdef enum RingErrorKind:
    RING_OK = 0
    RING_AVAIL_AHEAD = 1
    RING_BAD_HEAD = 2


class RingError(Exception):
    """The driver broke the ring itself (bad head index or avail index); the device needs reset."""


class GuestMemoryError(ValueError):
    """An address range is not inside one region of the memory table."""


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v

cdef inline uint32_t rd32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v

cdef inline uint64_t rd64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v

cdef inline void wr32(uint8_t *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


cdef struct Region:
    uint64_t gpa
    uint64_t size
    uint64_t uaddr
    uint8_t *host


cdef class GuestMemory:
    """The guest RAM regions of the vhost-user memory table, mapped into this process.

    `add_region` takes any writable buffer (an mmap of the region's fd in production, a
    bytearray in tests) whose bytes from `offset` on are guest-physical `gpa`...`gpa+size-1`.
    """

    cdef Region regions[MAX_REGIONS]
    cdef Py_buffer views[MAX_REGIONS]
    cdef int nregions
    cdef list _owners

    def __cinit__(self):
        self.nregions = 0
        self._owners = []

    def __dealloc__(self):
        self._release()

    cdef void _release(self):
        cdef int i
        for i in range(self.nregions):
            PyBuffer_Release(&self.views[i])
        self.nregions = 0

    def clear(self):
        """Forget every region (the caller may then close the mappings)."""
        self._release()
        self._owners = []

    def add_region(self, uint64_t gpa, uint64_t size, uint64_t uaddr, object buffer,
                   uint64_t offset=0):
        if self.nregions >= MAX_REGIONS:
            raise GuestMemoryError(f"too many memory regions (limit {MAX_REGIONS})")
        if size == 0 or gpa + size < gpa or uaddr + size < uaddr:
            raise GuestMemoryError(f"bad region gpa={gpa:#x} size={size:#x}")
        cdef int i = self.nregions
        PyObject_GetBuffer(buffer, &self.views[i], PyBUF_WRITABLE)
        if <uint64_t>self.views[i].len < offset or <uint64_t>self.views[i].len - offset < size:
            PyBuffer_Release(&self.views[i])
            raise GuestMemoryError(
                f"region gpa={gpa:#x} needs {offset + size:#x} bytes, buffer has "
                f"{self.views[i].len:#x}")
        self.regions[i].gpa = gpa
        self.regions[i].size = size
        self.regions[i].uaddr = uaddr
        self.regions[i].host = <uint8_t *>self.views[i].buf + offset
        self.nregions += 1
        self._owners.append(buffer)

    @property
    def regions_info(self):
        return [(self.regions[i].gpa, self.regions[i].size, self.regions[i].uaddr)
                for i in range(self.nregions)]

    cdef uint8_t *gpa_ptr(self, uint64_t gpa, uint64_t length) noexcept nogil:
        """Host pointer for [gpa, gpa+length) if it lies inside one region, else NULL."""
        cdef int i
        cdef Region *r
        for i in range(self.nregions):
            r = &self.regions[i]
            if gpa >= r.gpa and gpa - r.gpa <= r.size and length <= r.size - (gpa - r.gpa):
                return r.host + (gpa - r.gpa)
        return NULL

    cdef uint8_t *uaddr_ptr(self, uint64_t uaddr, uint64_t length) noexcept nogil:
        """Host pointer for a front-end (QEMU) virtual address range, else NULL."""
        cdef int i
        cdef Region *r
        for i in range(self.nregions):
            r = &self.regions[i]
            if (uaddr >= r.uaddr and uaddr - r.uaddr <= r.size
                    and length <= r.size - (uaddr - r.uaddr)):
                return r.host + (uaddr - r.uaddr)
        return NULL

    def read(self, uint64_t gpa, uint64_t length) -> bytes:
        cdef uint8_t *p = self.gpa_ptr(gpa, length)
        if p == NULL:
            raise GuestMemoryError(f"[{gpa:#x}, +{length:#x}) is outside guest RAM")
        return (<char *>p)[:length]

    def write(self, uint64_t gpa, const uint8_t[::1] data not None):
        cdef uint64_t n = data.shape[0]
        cdef uint8_t *p = self.gpa_ptr(gpa, n)
        if p == NULL:
            raise GuestMemoryError(f"[{gpa:#x}, +{n:#x}) is outside guest RAM")
        if n:
            memcpy(p, &data[0], n)

    def contains(self, uint64_t gpa, uint64_t length) -> bool:
        return self.gpa_ptr(gpa, length) != NULL


cdef class VirtQueue:
    """One split virtqueue whose rings and buffers live in guest memory."""

    cdef GuestMemory mem
    cdef readonly int index
    cdef readonly unsigned int num
    cdef readonly uint64_t desc_uaddr, avail_uaddr, used_uaddr
    cdef uint8_t *desc
    cdef uint8_t *avail
    cdef uint8_t *used
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
        if self.desc_uaddr % 16 or self.avail_uaddr % 2 or self.used_uaddr % 4:
            raise ValueError(f"virtqueue {self.index}: misaligned ring address")
        self.desc = self.mem.uaddr_ptr(self.desc_uaddr, VRING_DESC_SIZE * self.num)
        self.avail = self.mem.uaddr_ptr(self.avail_uaddr, 6 + 2 * self.num)
        self.used = self.mem.uaddr_ptr(self.used_uaddr, 6 + 8 * self.num)
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
        self.desc = self.avail = self.used = NULL

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
        return (viommu_load16(self.avail) & VRING_AVAIL_F_NO_INTERRUPT) == 0

    cdef uint16_t _avail_pending(self) noexcept nogil:
        if not self.started:
            return 0
        return <uint16_t>(viommu_load16(self.avail + 2) - self.last_avail)

    cdef void _suppress_kicks(self, bint suppress) noexcept nogil:
        """VRING_USED_F_NO_NOTIFY: the device is polling, the driver need not kick. Without
        VIRTIO_F_EVENT_IDX the driver reads this flag before every kick (spec 2.7.10)."""
        if self.started:
            viommu_store16(self.used, VRING_USED_F_NO_NOTIFY if suppress else 0)
            viommu_mb()

    @property
    def kicks_suppressed(self) -> bool:
        return self.started and (viommu_load16(self.used) & VRING_USED_F_NO_NOTIFY) != 0

    cdef int _pop_chain(self, uint16_t *head_out) noexcept nogil:
        """Take the next chain into the segment arrays, without the GIL.

        Returns 1 for a valid chain, 0 when the ring is empty, -1 for a malformed chain
        whose head can still be returned with used length 0, and -2 when the ring itself
        is corrupt (`ring_error` says how; `_pop` turns it into RingError).
        """
        cdef uint16_t avail_idx, head
        cdef unsigned int i, count = 0
        cdef bint seen_writable = False
        cdef uint8_t *d
        cdef uint64_t addr
        cdef uint32_t length
        cdef uint16_t flags
        cdef uint8_t *p
        if not self.started:
            return 0
        if self.ring_error != RING_OK:  # stays broken until the ring restarts
            return -2
        if self.has_pending:  # a chain popped by the request thread, left for Python
            self.has_pending = False
            head_out[0] = self.pending_head
            return 1
        avail_idx = viommu_load16(self.avail + 2)
        if avail_idx == self.last_avail:
            return 0
        if <uint16_t>(avail_idx - self.last_avail) > self.num:
            self.ring_error = RING_AVAIL_AHEAD
            self.ring_error_value = avail_idx
            return -2
        viommu_mb()
        head = rd16(self.avail + 4 + 2 * (self.last_avail % self.num))
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
            d = self.desc + VRING_DESC_SIZE * i
            addr = rd64(d)
            length = rd32(d + 8)
            flags = rd16(d + 12)
            if flags & VRING_DESC_F_INDIRECT:
                self.chains_malformed += 1
                return -1  # VIRTIO_RING_F_INDIRECT_DESC is not offered
            if flags & VRING_DESC_F_WRITE:
                seen_writable = True
            elif seen_writable:
                self.chains_malformed += 1
                return -1  # readable descriptor after a writable one
            if length:
                p = self.mem.gpa_ptr(addr, length)
                if p == NULL:
                    self.chains_malformed += 1
                    return -1
                self.seg_ptr[self.nseg] = p
                self.seg_len[self.nseg] = length
                self.seg_write[self.nseg] = 1 if flags & VRING_DESC_F_WRITE else 0
                self.nseg += 1
            if not flags & VRING_DESC_F_NEXT:
                return 1
            i = rd16(d + 14)
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
        cdef uint8_t *elem = self.used + 4 + 8 * (self.used_idx % self.num)
        wr32(elem, head)
        wr32(elem + 4, length)
        self.used_idx += 1

    cdef void _publish_used(self) noexcept nogil:
        viommu_mb()  # the elements before the index that reveals them
        viommu_store16(self.used + 2, self.used_idx)

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
        """Write one fault record into the next driver-posted buffer.

        Returns False when the driver has posted no buffer. A buffer that is malformed or
        too small for the record is returned with used length 0 (the spec forbids
        splitting a record across buffers) and the next one is tried.
        """
        cdef uint16_t head
        cdef int rc
        cdef unsigned int k
        cdef uint64_t room
        cdef uint32_t n = record.shape[0]
        cdef uint32_t done, chunk
        while True:
            rc = self._pop(&head)
            if rc == 0:
                return False
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
                memcpy(self.seg_ptr[k], &record[done], chunk)
                done += chunk
                k += 1
            self._push_used(head, n)
            return True


# A popped chain as a request: its readable bytes (up to the largest request) and where
# its writable part lies.
cdef struct Chain:
    uint8_t buf[MAX_READABLE]
    uint32_t got                # bytes of buf filled
    uint64_t readable
    uint64_t writable
    uint8_t *wseg_ptr[MAX_WRITABLE_SEGMENTS]
    uint32_t wseg_len[MAX_WRITABLE_SEGMENTS]
    unsigned int nwseg


cdef class Request:
    """One decoded virtio-iommu request. Fields the type does not have read as 0."""

    cdef VirtQueue vq
    cdef readonly uint16_t head
    cdef readonly uint8_t type
    cdef readonly uint32_t domain
    cdef readonly uint32_t endpoint
    cdef readonly uint32_t flags
    cdef readonly uint64_t virt_start
    cdef readonly uint64_t virt_end
    cdef readonly uint64_t phys_start
    cdef readonly bint reserved_zero
    # ATTACH_TABLE
    cdef readonly uint8_t format
    cdef readonly uint64_t ste0
    cdef readonly uint64_t ste1
    # INVALIDATE (flags above holds its flags)
    cdef readonly uint8_t scope
    cdef readonly uint8_t caches
    cdef readonly uint32_t pasid
    cdef readonly uint64_t arch_id
    cdef readonly uint64_t address
    cdef readonly uint64_t nr_pages
    cdef readonly uint8_t page_size
    # PAGE_RESP (flags above holds its flags; pasid above its PASID)
    cdef readonly uint16_t grpid
    cdef readonly uint16_t code
    cdef readonly uint32_t readable_len
    cdef readonly uint32_t writable_len
    cdef Chain chain

    @property
    def type_name(self) -> str:
        try:
            return RequestType(self.type).name.removeprefix("VIRTIO_IOMMU_T_")
        except ValueError:
            return f"type {self.type}"

    cdef uint32_t _complete(self, uint8_t status, const uint8_t[::1] payload) except? 0:
        """Write payload then tail into the writable part; returns the used length."""
        cdef uint32_t n = payload.shape[0]
        cdef uint8_t tail[REQ_TAIL_SIZE]
        if <uint64_t>n + REQ_TAIL_SIZE > self.writable_len:
            raise ValueError(f"payload of {n} bytes does not fit {self.writable_len} writable")
        if n:
            _scatter(&self.chain, 0, &payload[0], n)
        memset(tail, 0, REQ_TAIL_SIZE)
        tail[0] = status
        _scatter(&self.chain, n, tail, REQ_TAIL_SIZE)
        return n + REQ_TAIL_SIZE

    def __repr__(self):
        return (f"<Request {self.type_name} domain={self.domain} endpoint={self.endpoint} "
                f"virt=[{self.virt_start:#x},{self.virt_end:#x}] phys={self.phys_start:#x} "
                f"flags={self.flags:#x}>")


cdef int _readable_size(uint8_t req_type) noexcept nogil:
    if req_type == VIRTIO_IOMMU_T_ATTACH:
        return ATTACH_READABLE
    if req_type == VIRTIO_IOMMU_T_DETACH:
        return DETACH_READABLE
    if req_type == VIRTIO_IOMMU_T_MAP:
        return MAP_READABLE
    if req_type == VIRTIO_IOMMU_T_UNMAP:
        return UNMAP_READABLE
    if req_type == VIRTIO_IOMMU_T_PROBE:
        return PROBE_READABLE
    if req_type == VIRTIO_IOMMU_T_ATTACH_TABLE:
        return ATTACH_TABLE_READABLE
    if req_type == VIRTIO_IOMMU_T_INVALIDATE:
        return INVALIDATE_READABLE
    if req_type == VIRTIO_IOMMU_T_PAGE_RESP:
        return PAGE_RESP_READABLE
    return -1


cdef int _gather(VirtQueue vq, Chain *c) noexcept nogil:
    """Collect the chain in vq's segment arrays; its request type, or -1 when the spec says
    "cannot parse" (unknown type, readable part too small for its type, no room for the
    tail)."""
    cdef uint32_t chunk
    cdef unsigned int k
    cdef int need
    c.got = 0
    c.readable = 0
    c.writable = 0
    c.nwseg = 0
    for k in range(vq.nseg):
        if vq.seg_write[k]:
            if c.nwseg == MAX_WRITABLE_SEGMENTS:
                return -1
            c.wseg_ptr[c.nwseg] = vq.seg_ptr[k]
            c.wseg_len[c.nwseg] = vq.seg_len[k]
            c.nwseg += 1
            c.writable += vq.seg_len[k]
        else:
            c.readable += vq.seg_len[k]
            if c.got < MAX_READABLE:
                chunk = min(vq.seg_len[k], MAX_READABLE - c.got)
                memcpy(c.buf + c.got, vq.seg_ptr[k], chunk)
                c.got += chunk
    if c.got < REQ_HEAD_SIZE or c.writable < REQ_TAIL_SIZE or c.writable > MAX_WRITABLE_LEN:
        return -1
    need = _readable_size(c.buf[0])
    if need < 0 or c.got < <uint32_t>need:
        return -1
    return c.buf[0]


cdef void _scatter(Chain *c, uint32_t offset, const uint8_t *src, uint32_t n) noexcept nogil:
    """Copy n bytes into the chain's writable part, from `offset` on."""
    cdef unsigned int k = 0
    cdef uint32_t chunk
    while n and k < c.nwseg:
        if offset >= c.wseg_len[k]:
            offset -= c.wseg_len[k]
            k += 1
            continue
        chunk = min(c.wseg_len[k] - offset, n)
        memcpy(c.wseg_ptr[k] + offset, src, chunk)
        src += chunk
        n -= chunk
        offset = 0
        k += 1


cdef Request _parse_request(VirtQueue vq, uint16_t head):
    """Decode the chain in vq's segment arrays; None when it cannot be parsed."""
    cdef Request req = Request.__new__(Request)
    cdef uint8_t *buf = req.chain.buf
    req.vq = vq
    req.head = head
    if _gather(vq, &req.chain) < 0:
        return None
    req.type = buf[0]
    req.readable_len = <uint32_t>min(req.chain.readable, <uint64_t>0xffffffff)
    req.writable_len = <uint32_t>req.chain.writable
    req.reserved_zero = True
    if req.type == VIRTIO_IOMMU_T_ATTACH:
        req.domain = rd32(buf + 4)
        req.endpoint = rd32(buf + 8)
        req.flags = rd32(buf + 12)
        req.reserved_zero = rd32(buf + 16) == 0
    elif req.type == VIRTIO_IOMMU_T_DETACH:
        req.domain = rd32(buf + 4)
        req.endpoint = rd32(buf + 8)
        req.reserved_zero = rd64(buf + 12) == 0
    elif req.type == VIRTIO_IOMMU_T_MAP:
        req.domain = rd32(buf + 4)
        req.virt_start = rd64(buf + 8)
        req.virt_end = rd64(buf + 16)
        req.phys_start = rd64(buf + 24)
        req.flags = rd32(buf + 32)
    elif req.type == VIRTIO_IOMMU_T_UNMAP:
        req.domain = rd32(buf + 4)
        req.virt_start = rd64(buf + 8)
        req.virt_end = rd64(buf + 16)
        req.reserved_zero = rd32(buf + 24) == 0
    elif req.type == VIRTIO_IOMMU_T_PROBE:
        req.endpoint = rd32(buf + 4)
    elif req.type == VIRTIO_IOMMU_T_ATTACH_TABLE:
        req.domain = rd32(buf + 4)
        req.endpoint = rd32(buf + 8)
        req.format = buf[12]
        req.ste0 = rd64(buf + 16)
        req.ste1 = rd64(buf + 24)
        req.reserved_zero = _all_zero(buf + 13, 3) and _all_zero(buf + 32, 92)
    elif req.type == VIRTIO_IOMMU_T_INVALIDATE:
        req.scope = buf[4]
        req.caches = buf[5]
        req.flags = rd16(buf + 6)
        req.domain = rd32(buf + 8)
        req.pasid = rd32(buf + 12)
        req.arch_id = rd64(buf + 16)
        req.address = rd64(buf + 24)
        req.nr_pages = rd64(buf + 32)
        req.page_size = buf[40]
        req.reserved_zero = _all_zero(buf + 41, 19)
    elif req.type == VIRTIO_IOMMU_T_PAGE_RESP:
        req.endpoint = rd32(buf + 4)
        req.pasid = rd32(buf + 8)
        req.grpid = rd16(buf + 12)
        req.code = rd16(buf + 14)
        req.flags = rd32(buf + 16)
        req.reserved_zero = rd32(buf + 20) == 0
    return req


cdef bint _all_zero(const uint8_t *p, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        if p[i]:
            return False
    return True


include "engine.pxi"
include "requestq.pxi"
