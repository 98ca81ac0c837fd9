# The stream table: one entry per StreamID the engine translates for, sorted by StreamID,
# with its mode (MAP domain, guest page tables, bypass, blocked) and any configuration
# error latched on it (IHI 0070 7.3: C_BAD_STE, C_BAD_CD and C_BAD_SUBSTREAMID repeat until
# the stream is reconfigured).

cdef enum StreamMode:
    MODE_BYPASS = 1
    MODE_BLOCKED = 2
    MODE_MAP = 3
    MODE_TABLE = 4

cdef struct Stream:
    uint32_t sid
    uint8_t mode
    uint64_t ste0               # MODE_TABLE: STE dwords 0 and 1
    uint64_t ste1
    MapData *map                # MODE_MAP; Engine._tables keeps its owner alive
    uint32_t map_asid
    bint sticky                 # a configuration error is latched until reconfiguration
    Fault sticky_fault

cdef struct StreamTable:
    Stream *streams             # sorted by sid
    size_t n
    size_t cap


cdef Stream *streams_find(const StreamTable *t, uint32_t sid) noexcept nogil:
    cdef size_t lo = 0, hi = t.n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if t.streams[mid].sid < sid:
            lo = mid + 1
        else:
            hi = mid
    if lo < t.n and t.streams[lo].sid == sid:
        return &t.streams[lo]
    return NULL

cdef Stream *streams_add(StreamTable *t, uint32_t sid) noexcept nogil:
    """A new, zeroed entry for sid (not yet in the table); NULL when memory runs out."""
    cdef size_t i = 0, cap
    cdef Stream *grown
    while i < t.n and t.streams[i].sid < sid:
        i += 1
    if t.n == t.cap:
        cap = max(<size_t>8, 2 * t.cap)
        grown = <Stream *>realloc(t.streams, cap * sizeof(Stream))
        if grown == NULL:
            return NULL
        t.streams = grown
        t.cap = cap
    memmove(&t.streams[i + 1], &t.streams[i], (t.n - i) * sizeof(Stream))
    t.n += 1
    memset(&t.streams[i], 0, sizeof(Stream))
    t.streams[i].sid = sid
    return &t.streams[i]

cdef bint streams_remove(StreamTable *t, uint32_t sid) noexcept nogil:
    cdef Stream *s = streams_find(t, sid)
    cdef size_t i
    if s == NULL:
        return False
    i = s - t.streams
    memmove(s, s + 1, (t.n - i - 1) * sizeof(Stream))
    t.n -= 1
    return True

cdef void streams_destroy(StreamTable *t) noexcept nogil:
    free(t.streams)
    t.streams = NULL
    t.n = t.cap = 0
