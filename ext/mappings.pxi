# MAP/UNMAP domains: each domain's mappings in a sorted C array (`MapData`, `MappingTable`),
# and the rules that decide a MAP's or UNMAP's status (virtio spec 5.13.6, "MAP request"
# and "UNMAP request"), written once (`MapRules`) for both the request thread and
# viommu.device.virtio_iommu.

# --- a domain's mappings -----------------------------------------------------------------------

cdef struct MapEntry:
    uint64_t virt_start
    uint64_t virt_end       # inclusive
    uint64_t phys_start
    uint64_t flags

cdef struct MapData:
    MapEntry *entries       # sorted by virt_start, disjoint
    size_t n
    size_t cap
    uint64_t generation     # bumped when a mapping goes, so engines drop cached translations

cdef inline size_t map_first_ending_at_or_after(const MapData *d, uint64_t addr) noexcept nogil:
    # Disjoint sorted ranges have sorted ends too, so this is a plain binary search.
    cdef size_t lo = 0, hi = d.n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if d.entries[mid].virt_end < addr:
            lo = mid + 1
        else:
            hi = mid
    return lo

cdef inline const MapEntry *map_lookup(const MapData *d, uint64_t iova) noexcept nogil:
    cdef size_t i = map_first_ending_at_or_after(d, iova)
    if i < d.n and d.entries[i].virt_start <= iova:
        return &d.entries[i]
    return NULL

cdef int map_insert(MapData *d, size_t i, uint64_t start, uint64_t end, uint64_t phys,
                    uint64_t flags) noexcept nogil:
    """Insert at index i (where the sort order puts it); -1 when memory runs out."""
    cdef size_t cap
    cdef MapEntry *grown
    cdef MapEntry *e
    if d.n == d.cap:
        cap = max(2 * d.cap, <size_t>8)
        grown = <MapEntry *>realloc(d.entries, cap * sizeof(MapEntry))
        if grown == NULL:
            return -1
        d.entries = grown
        d.cap = cap
    e = &d.entries[i]
    memmove(e + 1, e, (d.n - i) * sizeof(MapEntry))
    e.virt_start = start
    e.virt_end = end
    e.phys_start = phys
    e.flags = flags
    d.n += 1
    return 0

cdef size_t map_inside_end(const MapData *d, size_t lo, uint64_t virt_start,
                           uint64_t virt_end) noexcept nogil:
    """Index past the run of mappings from `lo` on that lie inside [virt_start, virt_end].
    When the mapping there still overlaps the range (`map_overlaps_at`), it sticks out of
    it: UNMAP would split it."""
    cdef size_t hi = lo
    while (hi < d.n and d.entries[hi].virt_start >= virt_start
           and d.entries[hi].virt_end <= virt_end):
        hi += 1
    return hi

cdef inline bint map_overlaps_at(const MapData *d, size_t i, uint64_t virt_end) noexcept nogil:
    """Mapping i (one ending at or after the range's start) overlaps a range ending here."""
    return i < d.n and d.entries[i].virt_start <= virt_end

cdef void map_remove(MapData *d, size_t lo, size_t hi) noexcept nogil:
    """Remove entries [lo, hi); cached translations of them go stale (generation)."""
    if hi > lo:
        memmove(d.entries + lo, d.entries + hi, (d.n - hi) * sizeof(MapEntry))
        d.n -= hi - lo
        d.generation += 1


cdef object _mappings_module = None

cdef object _mappings():
    """viommu.device.mappings (Mapping, OverlapError, SplitError), imported on first use
    because it imports this module for MappingTable."""
    global _mappings_module
    if _mappings_module is None:
        from viommu.device import mappings
        _mappings_module = mappings
    return _mappings_module


cdef class MappingTable:
    """A domain's mappings: disjoint inclusive IOVA ranges, each one MAP request.

    UNMAP removes whole mappings only (virtio spec 5.13.6, "UNMAP request"): `remove_range`
    refuses to split one, raising SplitError and removing nothing. Entries live in a C
    array, so the engine looks IOVAs up without Python objects.
    """

    cdef MapData *data

    def __cinit__(self):
        self.data = <MapData *>calloc(1, sizeof(MapData))
        if self.data == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.data != NULL:
            free(self.data.entries)
            free(self.data)

    def __len__(self) -> int:
        return self.data.n

    def __iter__(self):
        return iter([self._mapping(i) for i in range(self.data.n)])

    def __repr__(self) -> str:
        return f"<MappingTable {self.data.n} mappings>"

    @property
    def generation(self) -> int:
        """Changes whenever a mapping is removed (translations cached from it are stale)."""
        return self.data.generation

    cdef object _mapping(self, size_t i):
        cdef MapEntry *e = &self.data.entries[i]
        return _mappings().Mapping(e.virt_start, e.virt_end, e.phys_start, e.flags)

    def add(self, mapping) -> None:
        """Insert `mapping` (a viommu.device.mappings.Mapping); OverlapError if it touches
        another."""
        cdef uint64_t start = mapping.virt_start, end = mapping.virt_end
        cdef uint64_t phys = mapping.phys_start, flags = mapping.flags
        cdef size_t i
        cdef MapEntry *e
        if end < start:
            raise ValueError(f"mapping [{start:#x}, {end:#x}] ends before it starts")
        i = map_first_ending_at_or_after(self.data, start)
        if map_overlaps_at(self.data, i, end):
            e = &self.data.entries[i]
            raise _mappings().OverlapError(f"[{start:#x}, {end:#x}] overlaps "
                                           f"[{e.virt_start:#x}, {e.virt_end:#x}]")
        if map_insert(self.data, i, start, end, phys, flags) < 0:
            raise MemoryError()

    def remove_range(self, uint64_t virt_start, uint64_t virt_end) -> list:
        """Remove every mapping inside [virt_start, virt_end]; all or nothing."""
        cdef size_t lo = map_first_ending_at_or_after(self.data, virt_start)
        cdef size_t hi = map_inside_end(self.data, lo, virt_start, virt_end), k
        cdef MapEntry *e
        if map_overlaps_at(self.data, hi, virt_end):
            e = &self.data.entries[hi]
            raise _mappings().SplitError(
                f"[{virt_start:#x}, {virt_end:#x}] would split mapping "
                f"[{e.virt_start:#x}, {e.virt_end:#x}]")
        removed = [self._mapping(k) for k in range(lo, hi)]
        map_remove(self.data, lo, hi)
        return removed

    def lookup(self, uint64_t iova):
        """The mapping containing `iova`, or None."""
        cdef const MapEntry *e = map_lookup(self.data, iova)
        if e == NULL:
            return None
        return self._mapping(e - self.data.entries)

    def overlaps(self, uint64_t virt_start, uint64_t virt_end) -> bool:
        return map_overlaps_at(self.data, map_first_ending_at_or_after(self.data, virt_start),
                               virt_end)


# --- the MAP/UNMAP rules -------------------------------------------------------------------------

cdef struct MapLimits:
    uint64_t known_flags        # MapFlag bits the driver may set (MMIO only with F_MMIO)
    uint64_t granule_mask       # the granule (page_size_mask's smallest page) - 1
    bint check_input_range      # VIRTIO_IOMMU_F_INPUT_RANGE negotiated
    uint64_t input_start, input_end
    uint64_t resv_start, resv_end   # the reserved MSI window PROBE reports (inclusive)
    size_t max_per_domain       # mappings, per domain and over all domains (S_NOMEM past them)
    size_t max_total

cdef uint8_t map_status(const MapLimits *r, const MapData *d, size_t total, uint64_t start,
                        uint64_t end, uint64_t phys, uint64_t flags, size_t *at) noexcept nogil:
    """The status of a MAP to an existing MAP domain (virtio spec 5.13.6, "MAP request"),
    `total` being the mappings over every domain; for S_OK, `at[0]` is where it goes."""
    cdef size_t i
    if flags & ~r.known_flags or end < start:
        return VIRTIO_IOMMU_S_INVAL
    if (start | phys | (end + 1)) & r.granule_mask:  # end + 1 wraps to 0 at the top: aligned
        return VIRTIO_IOMMU_S_RANGE
    if r.check_input_range and (start < r.input_start or end > r.input_end):
        return VIRTIO_IOMMU_S_RANGE
    if start <= r.resv_end and r.resv_start <= end:
        return VIRTIO_IOMMU_S_INVAL  # "a virtual address range ... reserved" ("MAP request")
    i = map_first_ending_at_or_after(d, start)
    if map_overlaps_at(d, i, end):
        return VIRTIO_IOMMU_S_INVAL
    if d.n >= r.max_per_domain or total >= r.max_total:
        return VIRTIO_IOMMU_S_NOMEM
    at[0] = i
    return VIRTIO_IOMMU_S_OK

cdef uint8_t map_apply(const MapLimits *r, MapData *d, size_t total, uint64_t start,
                       uint64_t end, uint64_t phys, uint64_t flags) noexcept nogil:
    """`map_status`, and the mapping added when it is S_OK."""
    cdef size_t at = 0
    cdef uint8_t status = map_status(r, d, total, start, end, phys, flags, &at)
    if status == VIRTIO_IOMMU_S_OK and map_insert(d, at, start, end, phys, flags) != 0:
        return VIRTIO_IOMMU_S_NOMEM
    return status

cdef uint8_t unmap_apply(MapData *d, uint64_t start, uint64_t end) noexcept nogil:
    """UNMAP of [start, end] from an existing MAP domain (virtio spec 5.13.6, "UNMAP
    request"): every mapping inside it removed (S_OK), or nothing when that would split
    one (S_RANGE)."""
    cdef size_t lo, hi
    if end < start:
        return VIRTIO_IOMMU_S_INVAL
    lo = map_first_ending_at_or_after(d, start)
    hi = map_inside_end(d, lo, start, end)
    if map_overlaps_at(d, hi, end):
        return VIRTIO_IOMMU_S_RANGE
    map_remove(d, lo, hi)
    return VIRTIO_IOMMU_S_OK


cdef class MapRules:
    """The device's rules for MAP and UNMAP, as numbers: the granule (a power of 2), the
    MapFlag bits it accepts, the input range when VIRTIO_IOMMU_F_INPUT_RANGE is negotiated
    (else None), the reserved [start, end] window, and the mapping limits.

    `map` and `unmap` apply a request to a MAP domain's table and return its status (a
    Status value), the table changed only on S_OK. The domain-level checks (the feature,
    an unknown domain, a bypass or page-table domain) are the caller's.
    """

    cdef MapLimits limits

    def __init__(self, uint64_t granule, uint64_t known_flags, input_range, tuple resv,
                 size_t max_per_domain, size_t max_total):
        if granule == 0 or granule & (granule - 1):
            raise ValueError(f"granule {granule:#x} is not a power of 2")
        self.limits.known_flags = known_flags
        self.limits.granule_mask = granule - 1
        self.limits.check_input_range = input_range is not None
        if input_range is not None:
            self.limits.input_start, self.limits.input_end = input_range
        self.limits.resv_start, self.limits.resv_end = resv
        self.limits.max_per_domain = max_per_domain
        self.limits.max_total = max_total

    def map(self, MappingTable table not None, uint64_t virt_start, uint64_t virt_end,
            uint64_t phys_start, uint64_t flags, size_t total_mappings) -> int:
        """MAP into `table`; `total_mappings` counts the mappings of every domain."""
        return map_apply(&self.limits, table.data, total_mappings, virt_start, virt_end,
                         phys_start, flags)

    def unmap(self, MappingTable table not None, uint64_t virt_start, uint64_t virt_end) -> int:
        return unmap_apply(table.data, virt_start, virt_end)
