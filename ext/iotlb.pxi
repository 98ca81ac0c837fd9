# The IOTLB: a set-associative cache of whole-page translations, tagged by stream,
# SubstreamID, page and (for invalidation by ASID) the ASID. A hit costs a hash, a 4-way tag
# compare and a shift (permissions are a mask over access bit-sets, see access.pxi). A
# translation taken from a MAP table also remembers the table's generation, so UNMAP makes
# it stale without a flush.

cdef struct TlbEntry:
    uint64_t page               # iova >> 12
    uint64_t ipa_page
    uint8_t *host_page
    const uint64_t *map_generation   # the MAP table's counter, or &NO_MAP_GENERATION
    uint64_t map_generation_seen
    uint32_t sid
    int32_t ssid
    uint32_t asid
    uint16_t allow
    uint8_t has_asid
    uint8_t valid

cdef enum:
    TLB_WAYS = 4    # set-associative, so a few hundred hot pages do not evict each other
cdef uint64_t HASH_PAGE = 0x9E3779B97F4A7C15
cdef uint64_t HASH_STREAM = 0xC2B2AE3D27D4EB4F

cdef struct Iotlb:
    TlbEntry *entries           # NULL: no IOTLB
    uint64_t size
    uint64_t set_mask
    uint32_t ways
    uint32_t victim             # round-robin replacement within a full set


cdef int tlb_init(Iotlb *t, uint64_t size) noexcept nogil:
    """`size` entries (0: no IOTLB, else a power of two); -1 when memory runs out."""
    memset(t, 0, sizeof(Iotlb))
    if size == 0:
        return 0
    t.entries = <TlbEntry *>calloc(size, sizeof(TlbEntry))
    if t.entries == NULL:
        return -1
    t.size = size
    t.ways = min(size, <uint64_t>TLB_WAYS)
    t.set_mask = size // t.ways - 1
    return 0

cdef void tlb_destroy(Iotlb *t) noexcept nogil:
    free(t.entries)
    t.entries = NULL


cdef inline TlbEntry *tlb_set(const Iotlb *t, uint32_t sid, int32_t ssid,
                              uint64_t page) noexcept nogil:
    cdef uint64_t h = page * HASH_PAGE
    h ^= ((<uint64_t>sid << 21) | <uint32_t>(ssid + 1)) * HASH_STREAM
    return &t.entries[(((h >> 32) ^ h) & t.set_mask) * t.ways]

cdef inline TlbEntry *tlb_find(const Iotlb *t, TlbEntry *ways, uint32_t sid, int32_t ssid,
                               uint64_t page) noexcept nogil:
    cdef uint32_t w
    for w in range(t.ways):
        if (ways[w].valid and ways[w].page == page and ways[w].sid == sid
                and ways[w].ssid == ssid):
            return &ways[w]
    return NULL

cdef inline TlbEntry *tlb_lookup(const Iotlb *t, uint32_t sid, int32_t ssid, uint64_t page,
                                 uint32_t access) noexcept nogil:
    """The entry translating `page` for this access, or NULL (a miss, a stale MAP
    translation, or one that does not permit the access: the walk decides)."""
    cdef TlbEntry *e
    if t.entries == NULL:
        return NULL
    e = tlb_find(t, tlb_set(t, sid, ssid, page), sid, ssid, page)
    if (e != NULL and e.map_generation[0] == e.map_generation_seen
            and (e.allow >> access) & 1):
        return e
    return NULL

cdef void tlb_fill(Iotlb *t, uint32_t sid, int32_t ssid, uint64_t iova,
                   const Xlat *x) noexcept nogil:
    cdef uint64_t page = iova >> S2_PAGE_SHIFT
    cdef TlbEntry *ways
    cdef TlbEntry *e
    cdef uint32_t w
    if t.entries == NULL:
        return
    ways = tlb_set(t, sid, ssid, page)
    e = tlb_find(t, ways, sid, ssid, page)
    if e == NULL:
        for w in range(t.ways):
            if not ways[w].valid:
                e = &ways[w]
                break
    if e == NULL:
        t.victim = (t.victim + 1) % t.ways
        e = &ways[t.victim]
    e.page = page
    e.ipa_page = x.ipa & ~<uint64_t>S2_PAGE_MASK
    e.host_page = x.host - (x.ipa & S2_PAGE_MASK)
    e.map_generation = x.map_generation
    e.map_generation_seen = x.map_generation[0]
    e.sid = sid
    e.ssid = ssid
    e.asid = x.asid
    e.has_asid = x.has_asid
    e.allow = x.allow
    e.valid = 1


cdef void tlb_flush_all(Iotlb *t) noexcept nogil:
    if t.entries != NULL:
        memset(t.entries, 0, t.size * sizeof(TlbEntry))

cdef void tlb_flush_matching(Iotlb *t, uint32_t sid, bint by_sid, uint32_t asid, bint by_asid,
                             uint64_t first_page, uint64_t last_page) noexcept nogil:
    cdef TlbEntry *e
    cdef uint64_t i
    if t.entries == NULL:
        return
    for i in range(t.size):
        e = &t.entries[i]
        if not e.valid or (by_sid and e.sid != sid):
            continue
        if by_asid and not (e.has_asid and e.asid == asid):
            continue
        if first_page <= e.page <= last_page:
            e.valid = 0

cdef inline void tlb_flush_stream(Iotlb *t, uint32_t sid) noexcept nogil:
    tlb_flush_matching(t, sid, True, 0, False, 0, <uint64_t>-1)
