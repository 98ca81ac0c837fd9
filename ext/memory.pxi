# Guest memory: the vhost-user memory table's regions mapped into this process, and the
# little-endian word and bit-field readers the rest of the data plane uses on them.


class GuestMemoryError(ValueError):
    """An address range is not inside one region of the memory table."""


cdef enum:
    MAX_REGIONS = 32


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v

cdef inline uint64_t rd64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef inline uint64_t field(uint64_t v, int msb, int lsb) noexcept nogil:
    """Bits [msb:lsb] of v, shifted down (the architecture's field notation)."""
    return (v >> lsb) & ((<uint64_t>2 << (msb - lsb)) - 1)

cdef inline uint64_t addr_field(uint64_t v, int msb, int lsb) noexcept nogil:
    """Bits [msb:lsb] of v kept in place: an address field."""
    return field(v, msb, lsb) << lsb

cdef inline uint64_t set_field(uint64_t value, int msb, int lsb) noexcept nogil:
    """value placed in bits [msb:lsb] (bits of value above the field's width dropped)."""
    return field(value, msb - lsb, 0) << lsb

cdef inline bint bit(uint64_t v, int n) noexcept nogil:
    return (v >> n) & 1


cdef bint all_zero(const void *p, size_t n) noexcept nogil:
    cdef const uint8_t *b = <const uint8_t *>p
    cdef size_t i
    for i in range(n):
        if b[i]:
            return False
    return True


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
