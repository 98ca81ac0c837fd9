# Translation engine: MAP/UNMAP tables, SMMUv3 stage 1 (STE -> CD -> AArch64 tables), a
# host-owned stage 2, an IOTLB and SMMUv3 event records. Included at the end of dataplane.pyx
# so it can reach GuestMemory's regions and rd64 without Python calls.
#
# Sources: Arm SMMUv3 (IHI 0070) for STE/CD/L1CD layouts, config checks and event records;
# Arm ARM VMSAv8-64 for the stage-1 walk; Linux arm-smmu-v3.h and QEMU hw/arm/smmuv3*.c,
# smmu-common.c for bit positions. Choices where the architecture leaves room are written
# where they are made; the main ones:
# - Stage 2 maps the whole 4 KiB pages of guest RAM (the GuestMemory regions) and is rebuilt
#   by itself when the memory table changes. A CD/L1CD/descriptor fetch from an IPA that is
#   not guest RAM aborts (F_CD_FETCH, F_WALK_EABT with FetchAddr); an output IPA there is a
#   stage-2 F_TRANSLATION. Overlay-revoked or read-only pages give stage-2 F_PERMISSION.
# - A guest STE may ask for abort, bypass or stage-1 translation only (stage 2 is the
#   host's); SubstreamIDs need stage 1 with S1CDMax > 0, else C_BAD_SUBSTREAMID; MAP-mode
#   streams behave as S1CDMax = 0.
# - C_BAD_STE, C_BAD_CD and C_BAD_SUBSTREAMID latch per stream until set_stream_*.
# - One translation covers one 4 KiB page (stage 2's granule), whatever the stage-1 leaf.
#
# Thread safety: an Engine is used by one thread at a time (callers serialise).

from libc.stdint cimport int32_t
from libc.stdlib cimport calloc, realloc
from libc.string cimport memcmp, memmove


# --- translate() access bits (this API's, not an architecture encoding) --------------------
cdef enum:
    ACC_READ = 1
    ACC_WRITE = 2
    ACC_EXEC = 4       # instruction fetch (InD); a write is never an instruction access
    ACC_PRIV = 8       # privileged (PnU)
    ACC_VALUES = 16    # access bit-sets are 0..15; IOTLB permission masks have one bit each

READ = ACC_READ
WRITE = ACC_WRITE
EXEC = ACC_EXEC
PRIV = ACC_PRIV


# --- SMMUv3 structure fields, as [msb:lsb] bit positions (IHI 0070 ch. 5; Linux
# STRTAB_STE_*, CTXDESC_*). Exported so the pure-Python reference and the test builders use
# these very definitions.
cpdef enum:
    STE_0_V = 0
    STE_0_CONFIG_MSB = 3
    STE_0_CONFIG_LSB = 1
    STE_0_S1FMT_MSB = 5
    STE_0_S1FMT_LSB = 4
    STE_0_S1CONTEXTPTR_MSB = 51
    STE_0_S1CONTEXTPTR_LSB = 6
    STE_0_S1CDMAX_MSB = 63
    STE_0_S1CDMAX_LSB = 59
    STE_1_S1DSS_MSB = 1
    STE_1_S1DSS_LSB = 0
    STE_1_S1STALLD = 27

    STRTAB_STE_0_CFG_ABORT = 0
    STRTAB_STE_0_CFG_BYPASS = 4
    STRTAB_STE_0_CFG_S1_TRANS = 5
    STRTAB_STE_0_CFG_S2_TRANS = 6
    STRTAB_STE_0_CFG_NESTED = 7

    STRTAB_STE_0_S1FMT_LINEAR = 0
    STRTAB_STE_0_S1FMT_4K_L2 = 1
    STRTAB_STE_0_S1FMT_64K_L2 = 2

    STRTAB_STE_1_S1DSS_TERMINATE = 0
    STRTAB_STE_1_S1DSS_BYPASS = 1
    STRTAB_STE_1_S1DSS_SSID0 = 2

    # Level-1 CD table descriptor; the leaf tables hold 2^SPLIT CDs.
    CTXDESC_L1_DESC_V = 0
    CTXDESC_L1_DESC_L2PTR_MSB = 51
    CTXDESC_L1_DESC_L2PTR_LSB = 12
    CTXDESC_L1_DESC_SIZE = 8
    CTXDESC_SPLIT_4K = 6
    CTXDESC_SPLIT_64K = 10

    CTXDESC_CD_SIZE = 64
    CD_0_T0SZ_MSB = 5
    CD_0_T0SZ_LSB = 0
    CD_0_TG0_MSB = 7
    CD_0_TG0_LSB = 6
    CD_0_EPD0 = 14
    CD_0_ENDI = 15
    CD_0_T1SZ_MSB = 21
    CD_0_T1SZ_LSB = 16
    CD_0_TG1_MSB = 23
    CD_0_TG1_LSB = 22
    CD_0_EPD1 = 30
    CD_0_V = 31
    CD_0_IPS_MSB = 34
    CD_0_IPS_LSB = 32
    CD_0_AFFD = 35
    CD_0_TBI0 = 38
    CD_0_TBI1 = 39
    CD_0_AA64 = 41
    CD_0_HD = 42
    CD_0_HA = 43
    CD_0_S = 44
    CD_0_R = 45
    CD_0_A = 46
    CD_0_ASID_MSB = 63
    CD_0_ASID_LSB = 48
    CD_1_HAD0 = 1         # dword 1 holds TTB0, dword 2 TTB1, same layout
    CD_1_TTB_MSB = 51
    CD_1_TTB_LSB = 4

    # TG0 and TG1 encode the granules differently.
    CD_TG0_4K = 0
    CD_TG0_64K = 1
    CD_TG0_16K = 2
    CD_TG1_16K = 1
    CD_TG1_4K = 2
    CD_TG1_64K = 3

    # VMSAv8-64 stage-1 descriptors (Arm ARM D8.3).
    DESC_VALID = 0
    DESC_TYPE = 1         # 1: table (levels 0-2) or page (level 3); 0: block
    DESC_AP1 = 6          # AP[1]: unprivileged access permitted
    DESC_AP2 = 7          # AP[2]: read-only
    DESC_AF = 10
    DESC_PXN = 53
    DESC_UXN = 54
    DESC_PXNTABLE = 59
    DESC_UXNTABLE = 60
    DESC_APTABLE0 = 61    # no unprivileged access below
    DESC_APTABLE1 = 62    # no write access below
    DESC_OA_MSB = 51

    # What this SMMU implements (the SMMU_IDR* it would advertise).
    SMMU_OAS_BITS = 48    # IDR5.OAS; also the IAS, the stage-2 input size
    SMMU_SSIDSIZE = 20    # IDR1.SSIDSIZE
    CD_TSZ_MIN = 16
    CD_TSZ_MAX = 39
    S2_PAGE_SHIFT = 12    # the host's stage 2 uses 4 KiB pages
    S2_LEVELS = 4
    S2_STRIDE = 9


# SMMUv3 event types (IHI 0070 7.3); viommu.events.smmuv3.EventId is the Python view of the same.
cdef enum:
    C_BAD_STREAMID = 0x02
    C_BAD_STE = 0x04
    F_STREAM_DISABLED = 0x06
    C_BAD_SUBSTREAMID = 0x08
    F_CD_FETCH = 0x09
    C_BAD_CD = 0x0A
    F_WALK_EABT = 0x0B
    F_TRANSLATION = 0x10
    F_ADDR_SIZE = 0x11
    F_ACCESS = 0x12
    F_PERMISSION = 0x13

    CLASS_CD = 0
    CLASS_TT = 1
    CLASS_IN = 2

    # Event record fields (IHI 0070 7.3; Linux EVTQ_*).
    EVTQ_0_SSV = 11
    EVTQ_0_SSID_LSB = 12
    EVTQ_0_SID_LSB = 32
    EVTQ_1_PnU = 33
    EVTQ_1_InD = 34
    EVTQ_1_RnW = 35
    EVTQ_1_S2 = 39
    EVTQ_1_CLASS_LSB = 40
    EVTQ_1_TT_READ = 44
    EVTQ_3_IPA_LSB = 12
    EVTQ_3_FETCH_ADDR_LSB = 3
    EVTQ_3_ADDR_MSB = 51
    EVENT_RECORD_SIZE = 32

# virtio-iommu MAP flags (virtio spec 5.13.6.6; viommu.uapi.MapFlag in Python)
cdef enum:
    VIRTIO_IOMMU_MAP_F_READ = 1
    VIRTIO_IOMMU_MAP_F_WRITE = 2

cdef enum:
    S2_PAGE_SIZE = 1 << S2_PAGE_SHIFT
    S2_PAGE_MASK = S2_PAGE_SIZE - 1
    S2_ENTRIES = 1 << S2_STRIDE


cdef inline uint64_t field(uint64_t v, int msb, int lsb) noexcept nogil:
    """Bits [msb:lsb] of v, shifted down (the architecture's field notation)."""
    return (v >> lsb) & ((<uint64_t>2 << (msb - lsb)) - 1)

cdef inline uint64_t addr_field(uint64_t v, int msb, int lsb) noexcept nogil:
    """Bits [msb:lsb] of v kept in place: an address field."""
    return field(v, msb, lsb) << lsb

cdef inline bint bit(uint64_t v, int n) noexcept nogil:
    return (v >> n) & 1


# --- permissions as 16-bit masks over access bit-sets --------------------------------------
# A translation's permissions are stored as "which of the 16 access bit-sets pass", so an
# IOTLB hit is one shift, and a walk's verdict for one access equals the cached one.

cdef uint16_t RW_ALLOW[4]       # indexed by rw_index (MAP flags, stage-2 pages)
cdef uint16_t VMSA_ALLOW[16]    # indexed by read_only | el0 << 1 | pxn << 2 | uxn << 3

cdef inline int rw_index(uint64_t read, uint64_t write) noexcept nogil:
    return (read != 0) | (write != 0) << 1

cdef bint _rw_permits(uint32_t access, bint read, bint write) noexcept nogil:
    if not access & (ACC_READ | ACC_WRITE | ACC_EXEC):
        return False
    if access & ACC_WRITE and not write:
        return False
    # an instruction fetch reads memory: MAP flags and stage 2 have no execute control
    return not (access & (ACC_READ | ACC_EXEC)) or read

cdef bint _vmsa_permits(uint32_t access, bint read_only, bint el0, bint pxn,
                        bint uxn) noexcept nogil:
    """Stage-1 AArch64 EL1&0 permissions (Arm ARM D8.4)."""
    cdef bint priv = access & ACC_PRIV
    cdef bint data_ok = priv or el0
    if not access & (ACC_READ | ACC_WRITE | ACC_EXEC):
        return False
    if access & ACC_WRITE and (read_only or not data_ok):
        return False
    if access & ACC_READ and not data_ok:
        return False
    if access & ACC_EXEC and not access & ACC_WRITE:
        # memory writable at EL0 is never privileged-executable
        if priv and (pxn or (el0 and not read_only)):
            return False
        if not priv and uxn:
            return False
    return True

cdef void _init_permission_tables() noexcept nogil:
    cdef uint32_t a, i
    for i in range(4):
        RW_ALLOW[i] = 0
        for a in range(ACC_VALUES):
            if _rw_permits(a, i & 1, i & 2):
                RW_ALLOW[i] |= <uint16_t>(1 << a)
    for i in range(16):
        VMSA_ALLOW[i] = 0
        for a in range(ACC_VALUES):
            if _vmsa_permits(a, i & 1, i & 2, i & 4, i & 8):
                VMSA_ALLOW[i] |= <uint16_t>(1 << a)

_init_permission_tables()


# --- MAP/UNMAP domain table ------------------------------------------------------------------

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

cdef size_t map_first_ending_at_or_after(const MapData *d, uint64_t addr) noexcept nogil:
    # Disjoint sorted ranges have sorted ends too, so this is a plain binary search.
    cdef size_t lo = 0, hi = d.n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if d.entries[mid].virt_end < addr:
            lo = mid + 1
        else:
            hi = mid
    return lo

cdef const MapEntry *map_lookup(const MapData *d, uint64_t iova) noexcept nogil:
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
    """viommu.device.mappings (Mapping, OverlapError, SplitError), imported on first use because it
    imports this module for MappingTable."""
    global _mappings_module
    if _mappings_module is None:
        from viommu.device import mappings
        _mappings_module = mappings
    return _mappings_module


cdef class MappingTable:
    """A domain's mappings: disjoint inclusive IOVA ranges, each one MAP request.

    UNMAP removes whole mappings only (virtio spec 5.13.6.7): `remove_range` refuses to split
    one, raising SplitError and removing nothing. Entries live in a C array, so the engine
    looks IOVAs up without Python objects.
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
        """Insert `mapping` (a viommu.device.mappings.Mapping); OverlapError if it touches another."""
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


# --- faults and event records ----------------------------------------------------------------

cdef struct Fault:
    # the transaction
    uint32_t sid
    int32_t ssid            # -1: no SubstreamID
    uint64_t iova
    uint32_t access
    # what went wrong
    uint8_t event_id
    bint recorded           # False: terminated without an event (STE abort, CD.R == 0)
    bint s2
    uint8_t cls
    bint ttrnw
    uint64_t ipa
    uint64_t fetch_addr

cdef inline void fault_init(Fault *f, uint32_t sid, int32_t ssid, uint64_t iova,
                            uint32_t access) noexcept nogil:
    memset(f, 0, sizeof(Fault))
    f.sid = sid
    f.ssid = ssid
    f.iova = iova
    f.access = access

cdef inline int config_fault(Fault *f, uint8_t event_id) noexcept nogil:
    f.event_id = event_id
    f.recorded = True
    return -1

cdef inline int fetch_fault(Fault *f, uint8_t event_id, uint8_t cls,
                            uint64_t addr) noexcept nogil:
    f.event_id = event_id
    f.cls = cls
    f.fetch_addr = addr
    f.ttrnw = cls == CLASS_TT
    f.recorded = True
    return -1

cdef inline int stage1_fault(Fault *f, uint8_t event_id, bint recorded) noexcept nogil:
    f.event_id = event_id
    f.cls = CLASS_IN
    f.recorded = recorded
    return -1

cdef inline int stage2_fault(Fault *f, uint8_t event_id, uint8_t cls,
                             uint64_t ipa) noexcept nogil:
    # Stage 2 belongs to the host (STE.S2R = 1): its faults are always recorded.
    f.event_id = event_id
    f.cls = cls
    f.s2 = True
    f.ipa = ipa
    f.ttrnw = cls == CLASS_TT
    f.recorded = True
    return -1

cdef inline bint is_config_event(uint8_t event_id) noexcept nogil:
    # Configuration errors stay until the stream is reprogrammed, as on hardware.
    return event_id == C_BAD_STE or event_id == C_BAD_CD or event_id == C_BAD_SUBSTREAMID

cdef void encode_event(const Fault *f, uint8_t *out) noexcept nogil:
    """The 32-byte event record (IHI 0070 7.3), with the fields each event type carries."""
    cdef uint64_t dw[4]
    cdef uint8_t t = f.event_id
    cdef bint ssv = f.ssid >= 0
    cdef bint addressed = t == F_WALK_EABT or (F_TRANSLATION <= t <= F_PERMISSION)
    dw[0] = t | (<uint64_t>f.sid << EVTQ_0_SID_LSB)
    dw[1] = dw[2] = dw[3] = 0
    if t != F_STREAM_DISABLED and ssv:
        dw[0] |= (<uint64_t>1 << EVTQ_0_SSV) | (<uint64_t>f.ssid << EVTQ_0_SSID_LSB)
    if t == F_CD_FETCH or t == F_WALK_EABT:
        dw[3] = addr_field(f.fetch_addr, EVTQ_3_ADDR_MSB, EVTQ_3_FETCH_ADDR_LSB)
    if addressed:
        dw[1] = ((<uint64_t>((f.access & ACC_PRIV) != 0) << EVTQ_1_PnU)
                 | (<uint64_t>(f.access & ACC_EXEC and not f.access & ACC_WRITE) << EVTQ_1_InD)
                 | (<uint64_t>(not f.access & ACC_WRITE) << EVTQ_1_RnW)
                 | (<uint64_t>f.s2 << EVTQ_1_S2)
                 | (<uint64_t>f.cls << EVTQ_1_CLASS_LSB)
                 | (<uint64_t>f.ttrnw << EVTQ_1_TT_READ))
        dw[2] = f.iova
        if f.s2:
            dw[3] = addr_field(f.ipa, EVTQ_3_ADDR_MSB, EVTQ_3_IPA_LSB)
    memcpy(out, dw, EVENT_RECORD_SIZE)

cdef bytes fault_record(const Fault *f):
    cdef uint8_t raw[EVENT_RECORD_SIZE]
    encode_event(f, raw)
    return (<char *>raw)[:EVENT_RECORD_SIZE]


# --- stage 2: the host's 4-level radix over guest RAM ----------------------------------------
# IPA bits [47:39], [38:30], [29:21], [20:12] index levels 0-3. A leaf is 16 bits: valid,
# read, write, and the index of the memory region the page lives in (host = region.host +
# (ipa - region.gpa)), so a page costs two bytes.

cdef enum:
    S2_VALID = 1
    S2_READ = 2
    S2_WRITE = 4
    S2_REGION_SHIFT = 8

cdef struct S2Node:
    void *next[S2_ENTRIES]

cdef struct S2Leaves:
    uint16_t page[S2_ENTRIES]

cdef struct S2Op:               # one s2_set_perm call, replayed when stage 2 is rebuilt
    uint64_t first_page
    uint64_t last_page
    uint16_t perm

cdef inline size_t s2_index(uint64_t ipa, int level) noexcept nogil:
    return field(ipa, S2_PAGE_SHIFT + S2_STRIDE * (4 - level) - 1,
                 S2_PAGE_SHIFT + S2_STRIDE * (3 - level))

cdef uint16_t *s2_slot(S2Node *root, uint64_t ipa, bint create) noexcept nogil:
    """The level-3 entry for ipa's page; NULL if absent (or out of memory when creating)."""
    cdef S2Node *node = root
    cdef void **link
    cdef int level
    if root == NULL or ipa >> SMMU_OAS_BITS:
        return NULL
    for level in range(S2_LEVELS - 1):
        link = &node.next[s2_index(ipa, level)]
        if link[0] == NULL:
            if not create:
                return NULL
            link[0] = calloc(1, sizeof(S2Leaves) if level == S2_LEVELS - 2 else sizeof(S2Node))
            if link[0] == NULL:
                return NULL
        node = <S2Node *>link[0]
    return &(<S2Leaves *>node).page[s2_index(ipa, S2_LEVELS - 1)]

cdef void s2_free(void *node, int level) noexcept nogil:
    cdef size_t i
    if node == NULL:
        return
    if level < S2_LEVELS - 1:
        for i in range(S2_ENTRIES):
            s2_free((<S2Node *>node).next[i], level + 1)
    free(node)


# --- IOTLB -------------------------------------------------------------------------------------

cdef struct TlbEntry:
    uint64_t page               # iova >> 12
    uint64_t ipa_page
    uint8_t *host_page
    const uint64_t *map_generation   # the MAP table's counter, or NO_MAP_GENERATION
    uint64_t map_generation_seen
    uint32_t sid
    int32_t ssid
    uint32_t asid
    uint16_t allow
    uint8_t has_asid
    uint8_t valid

cdef uint64_t NO_MAP_GENERATION = 0
cdef enum:
    TLB_WAYS = 4    # set-associative, so a few hundred hot pages do not evict each other
cdef uint64_t HASH_PAGE = 0x9E3779B97F4A7C15
cdef uint64_t HASH_STREAM = 0xC2B2AE3D27D4EB4F


# --- streams -----------------------------------------------------------------------------------

cdef enum StreamMode:
    MODE_BYPASS = 1
    MODE_BLOCKED = 2
    MODE_MAP = 3
    MODE_TABLE = 4

cdef struct Stream:
    uint32_t sid
    uint8_t mode
    uint64_t ste0
    uint64_t ste1
    MapData *map                # MODE_MAP; Engine._tables keeps its owner alive
    uint32_t map_asid
    bint sticky                 # a configuration error is latched until reconfiguration
    Fault sticky_fault

cdef struct Xlat:               # one successful translation
    uint64_t ipa
    uint8_t *host
    uint64_t avail              # bytes from iova that share this translation
    uint16_t allow
    uint32_t asid
    bint has_asid
    bint cacheable
    const uint64_t *map_generation

cdef struct CDInfo:             # a decoded, checked context descriptor
    uint64_t ttb[2]
    uint8_t tsz[2]
    uint8_t granule[2]          # log2 of the granule size
    bint epd[2]
    bint had[2]
    bint tbi[2]
    uint8_t oas
    bint affd
    bint record
    uint32_t asid

cdef struct S1Leaf:
    uint64_t ipa
    uint16_t allow


cdef int ips_bits(uint64_t ips) noexcept nogil:
    """CD.IPS -> output address bits, capped at what this SMMU implements."""
    cdef int bits
    if ips == 0:
        bits = 32
    elif ips == 1:
        bits = 36
    elif ips == 2:
        bits = 40
    elif ips == 3:
        bits = 42
    elif ips == 4:
        bits = 44
    else:
        bits = 48  # 5 = 48; 6 (52 bits) and reserved values act as the largest supported
    return min(bits, SMMU_OAS_BITS)

cdef int granule_bits(int half, uint64_t tg) noexcept nogil:
    """log2 of the granule a TG0/TG1 value selects; 0 for a reserved encoding."""
    if half == 0:
        return 12 if tg == CD_TG0_4K else 16 if tg == CD_TG0_64K else 14 if tg == CD_TG0_16K else 0
    return 12 if tg == CD_TG1_4K else 16 if tg == CD_TG1_64K else 14 if tg == CD_TG1_16K else 0

cdef int decode_cd(const uint8_t *raw, CDInfo *cd) noexcept nogil:
    """Fill cd from a 64-byte CD; -1 if this SMMU must reject it with C_BAD_CD."""
    cdef uint64_t d0 = rd64(raw)
    cdef int half
    cdef uint64_t ttb
    if not bit(d0, CD_0_V) or not bit(d0, CD_0_AA64):
        return -1  # invalid, or AArch32 tables (IDR0.TTF = AArch64 only)
    if bit(d0, CD_0_ENDI) or not bit(d0, CD_0_A) or bit(d0, CD_0_S):
        return -1  # little-endian tables, TERM_MODEL = 1 (A must be 1), no stall model
    if bit(d0, CD_0_HA) or bit(d0, CD_0_HD):
        return -1  # no hardware access/dirty flag updates (IDR0.HTTU = 0)
    cd.oas = ips_bits(field(d0, CD_0_IPS_MSB, CD_0_IPS_LSB))
    cd.affd = bit(d0, CD_0_AFFD)
    cd.record = bit(d0, CD_0_R)
    cd.asid = field(d0, CD_0_ASID_MSB, CD_0_ASID_LSB)
    cd.tbi[0] = bit(d0, CD_0_TBI0)
    cd.tbi[1] = bit(d0, CD_0_TBI1)
    cd.epd[0] = bit(d0, CD_0_EPD0)
    cd.epd[1] = bit(d0, CD_0_EPD1)
    cd.tsz[0] = field(d0, CD_0_T0SZ_MSB, CD_0_T0SZ_LSB)
    cd.tsz[1] = field(d0, CD_0_T1SZ_MSB, CD_0_T1SZ_LSB)
    cd.granule[0] = granule_bits(0, field(d0, CD_0_TG0_MSB, CD_0_TG0_LSB))
    cd.granule[1] = granule_bits(1, field(d0, CD_0_TG1_MSB, CD_0_TG1_LSB))
    for half in range(2):
        ttb = rd64(raw + 8 * (1 + half))
        cd.had[half] = bit(ttb, CD_1_HAD0)
        cd.ttb[half] = addr_field(ttb, CD_1_TTB_MSB, CD_1_TTB_LSB)
        if cd.epd[half]:
            continue  # a disabled half's fields are ignored
        if not CD_TSZ_MIN <= cd.tsz[half] <= CD_TSZ_MAX or cd.granule[half] == 0:
            return -1
        if cd.ttb[half] >> cd.oas:
            return -1
    return 0

cdef inline bint block_allowed(int granule, int level) noexcept nogil:
    # Without FEAT_LPA/LPA2: 4K blocks at levels 1-2, 16K and 64K blocks at level 2 only.
    return level == 2 or (granule == 12 and level == 1)


cdef class Engine:
    """Translates DMA from endpoints: stage 1 as the guest configured it, then the host's
    stage 2, with an IOTLB. See `translate` for results and `set_stream_*` for modes."""

    cdef GuestMemory mem
    cdef Stream *streams            # sorted by sid
    cdef size_t nstreams
    cdef size_t streams_cap
    cdef dict _tables               # sid -> MappingTable of MAP-mode streams
    cdef S2Node *s2_root
    cdef Region s2_layout[MAX_REGIONS]   # the memory table stage 2 was built from
    cdef int s2_nregions
    cdef S2Op *s2_ops
    cdef size_t s2_nops
    cdef size_t s2_ops_cap
    cdef TlbEntry *tlb
    cdef uint64_t tlb_entries
    cdef uint64_t tlb_set_mask
    cdef uint32_t tlb_ways
    cdef uint32_t tlb_victim        # round-robin replacement within a full set
    cdef readonly uint64_t iotlb_hits
    cdef readonly uint64_t iotlb_misses

    def __cinit__(self, GuestMemory mem not None, int iotlb_size=4096):
        if iotlb_size < 0 or iotlb_size & (iotlb_size - 1):
            raise ValueError(f"iotlb_size must be 0 (no IOTLB) or a power of two, "
                             f"not {iotlb_size}")
        self.mem = mem
        self._tables = {}
        if iotlb_size:
            self.tlb = <TlbEntry *>calloc(iotlb_size, sizeof(TlbEntry))
            if self.tlb == NULL:
                raise MemoryError()
            self.tlb_entries = iotlb_size
            self.tlb_ways = min(iotlb_size, TLB_WAYS)
            self.tlb_set_mask = iotlb_size // self.tlb_ways - 1
        if self._build_stage2() != 0:
            raise MemoryError()

    def __dealloc__(self):
        s2_free(self.s2_root, 0)
        free(self.s2_ops)
        free(self.tlb)
        free(self.streams)

    # --- stage 2 -------------------------------------------------------------------------------

    cdef int _build_stage2(self) noexcept nogil:
        """(Re)build stage 2 from the memory table with full access, then replay the overlay."""
        cdef int i
        cdef size_t k
        s2_free(self.s2_root, 0)
        self.s2_root = <S2Node *>calloc(1, sizeof(S2Node))
        self.s2_nregions = self.mem.nregions
        memcpy(self.s2_layout, self.mem.regions, self.mem.nregions * sizeof(Region))
        if self.s2_root == NULL:
            return -1
        for i in range(self.s2_nregions):
            if self._map_region(i) != 0:
                return -1
        for k in range(self.s2_nops):
            self._apply_s2_op(&self.s2_ops[k])
        self._flush_all()
        return 0

    cdef int _map_region(self, int index) noexcept nogil:
        # Whole pages only; a page already mapped by an earlier region keeps it, as
        # GuestMemory.gpa_ptr prefers the first region that contains an address.
        cdef Region *r = &self.s2_layout[index]
        cdef uint64_t ipa = (r.gpa + S2_PAGE_MASK) & ~<uint64_t>S2_PAGE_MASK
        cdef uint16_t *slot
        while ipa >= r.gpa and ipa - r.gpa + S2_PAGE_SIZE <= r.size:
            slot = s2_slot(self.s2_root, ipa, True)
            if slot == NULL:
                if ipa >> SMMU_OAS_BITS:
                    return 0  # beyond the IPA size: stage 2 cannot map it
                return -1
            if slot[0] == 0:
                slot[0] = S2_VALID | S2_READ | S2_WRITE | (index << S2_REGION_SHIFT)
            ipa += S2_PAGE_SIZE
        return 0

    cdef uint64_t _apply_s2_op(self, const S2Op *op) noexcept nogil:
        """Set the permissions of the RAM pages in the op's range; returns how many."""
        cdef uint64_t n = 0, page, first, last
        cdef uint16_t *slot
        cdef int i
        for i in range(self.s2_nregions):
            # only pages inside region i can hold its leaves: skip the holes of a huge range
            first = max(op.first_page, (self.s2_layout[i].gpa + S2_PAGE_MASK) >> S2_PAGE_SHIFT)
            last = min(op.last_page,
                       ((self.s2_layout[i].gpa + self.s2_layout[i].size) >> S2_PAGE_SHIFT) - 1)
            page = first
            while page <= last:
                slot = s2_slot(self.s2_root, page << S2_PAGE_SHIFT, False)
                if slot != NULL and slot[0] & S2_VALID and slot[0] >> S2_REGION_SHIFT == i:
                    slot[0] = (slot[0] & ~<uint16_t>(S2_READ | S2_WRITE)) | op.perm
                    n += 1
                page += 1
        return n

    cdef inline bint _layout_current(self) noexcept nogil:
        return (self.s2_nregions == self.mem.nregions and memcmp(
            self.s2_layout, self.mem.regions, self.s2_nregions * sizeof(Region)) == 0)

    cdef inline uint16_t _s2_page(self, uint64_t ipa) noexcept nogil:
        cdef uint16_t *slot = s2_slot(self.s2_root, ipa, False)
        return slot[0] if slot != NULL else 0

    cdef inline uint8_t *_s2_host(self, uint16_t leaf, uint64_t ipa) noexcept nogil:
        cdef Region *r = &self.s2_layout[leaf >> S2_REGION_SHIFT]
        return r.host + (ipa - r.gpa)

    cdef const uint8_t *_fetch(self, uint64_t ipa, uint8_t cls, Fault *f) noexcept nogil:
        """A CD, L1CD or table descriptor read at `ipa`, through stage 2 as on nested
        hardware. Outside guest RAM nothing answers: the fetch aborts (F_CD_FETCH for
        configuration, F_WALK_EABT for tables)."""
        cdef uint16_t leaf = self._s2_page(ipa)
        if not leaf & S2_VALID:
            if cls == CLASS_CD:
                fetch_fault(f, F_CD_FETCH, cls, ipa)
            else:
                fetch_fault(f, F_WALK_EABT, cls, ipa)
            return NULL
        if not leaf & S2_READ:
            stage2_fault(f, F_PERMISSION, cls, ipa)
            return NULL
        return self._s2_host(leaf, ipa)

    # --- IOTLB ---------------------------------------------------------------------------------

    cdef inline TlbEntry *_tlb_set(self, uint32_t sid, int32_t ssid,
                                   uint64_t page) noexcept nogil:
        cdef uint64_t h = page * HASH_PAGE
        h ^= ((<uint64_t>sid << 21) | <uint32_t>(ssid + 1)) * HASH_STREAM
        return &self.tlb[(((h >> 32) ^ h) & self.tlb_set_mask) * self.tlb_ways]

    cdef inline TlbEntry *_tlb_find(self, TlbEntry *ways, uint32_t sid, int32_t ssid,
                                    uint64_t page) noexcept nogil:
        cdef uint32_t w
        for w in range(self.tlb_ways):
            if (ways[w].valid and ways[w].page == page and ways[w].sid == sid
                    and ways[w].ssid == ssid):
                return &ways[w]
        return NULL

    cdef void _flush_all(self) noexcept nogil:
        if self.tlb != NULL:
            memset(self.tlb, 0, self.tlb_entries * sizeof(TlbEntry))

    cdef void _flush_matching(self, uint32_t sid, bint by_sid, uint32_t asid, bint by_asid,
                              uint64_t first_page, uint64_t last_page) noexcept nogil:
        cdef TlbEntry *e
        cdef uint64_t i
        if self.tlb == NULL:
            return
        for i in range(self.tlb_entries):
            e = &self.tlb[i]
            if not e.valid or (by_sid and e.sid != sid):
                continue
            if by_asid and not (e.has_asid and e.asid == asid):
                continue
            if first_page <= e.page <= last_page:
                e.valid = 0

    cdef void _flush_stream(self, uint32_t sid) noexcept nogil:
        self._flush_matching(sid, True, 0, False, 0, <uint64_t>-1)

    cdef void _fill(self, uint32_t sid, int32_t ssid, uint64_t iova,
                    const Xlat *x) noexcept nogil:
        cdef uint64_t page = iova >> S2_PAGE_SHIFT
        cdef TlbEntry *ways = self._tlb_set(sid, ssid, page)
        cdef TlbEntry *e = self._tlb_find(ways, sid, ssid, page)
        cdef uint32_t w
        if e == NULL:
            for w in range(self.tlb_ways):
                if not ways[w].valid:
                    e = &ways[w]
                    break
        if e == NULL:
            self.tlb_victim = (self.tlb_victim + 1) % self.tlb_ways
            e = &ways[self.tlb_victim]
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

    # --- streams -------------------------------------------------------------------------------

    cdef Stream *_find_stream(self, uint32_t sid) noexcept nogil:
        cdef size_t lo = 0, hi = self.nstreams, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.streams[mid].sid < sid:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.nstreams and self.streams[lo].sid == sid:
            return &self.streams[lo]
        return NULL

    cdef Stream *_add_stream(self, uint32_t sid) except NULL:
        cdef size_t i = 0, cap
        cdef Stream *grown
        while i < self.nstreams and self.streams[i].sid < sid:
            i += 1
        if self.nstreams == self.streams_cap:
            cap = max(8, 2 * self.streams_cap)
            grown = <Stream *>realloc(self.streams, cap * sizeof(Stream))
            if grown == NULL:
                raise MemoryError()
            self.streams = grown
            self.streams_cap = cap
        memmove(&self.streams[i + 1], &self.streams[i], (self.nstreams - i) * sizeof(Stream))
        self.nstreams += 1
        memset(&self.streams[i], 0, sizeof(Stream))
        self.streams[i].sid = sid
        return &self.streams[i]

    cdef Stream *_configure(self, uint32_t sid, uint8_t mode) except NULL:
        """Reprogram a stream: drops its cached translations and any latched config error."""
        cdef Stream *s = self._find_stream(sid)
        if s == NULL:
            s = self._add_stream(sid)
        memset(s, 0, sizeof(Stream))
        s.sid = sid
        s.mode = mode
        self._tables.pop(sid, None)
        self._flush_stream(sid)
        return s

    # --- the walk ------------------------------------------------------------------------------

    cdef int _output(self, uint64_t ipa, uint16_t s1_allow, uint64_t avail, bint record_s1,
                     Xlat *x, Fault *f) noexcept nogil:
        """Finish a translation whose stage 1 produced `ipa`: stage-1 permission, then the
        host's stage 2 for the output address (CLASS=IN)."""
        cdef uint16_t leaf, s2_allow
        if not (s1_allow >> f.access) & 1:
            return stage1_fault(f, F_PERMISSION, record_s1)
        leaf = self._s2_page(ipa)
        if not leaf & S2_VALID:
            return stage2_fault(f, F_TRANSLATION, CLASS_IN, ipa)
        s2_allow = RW_ALLOW[rw_index(leaf & S2_READ, leaf & S2_WRITE)]
        if not (s2_allow >> f.access) & 1:
            return stage2_fault(f, F_PERMISSION, CLASS_IN, ipa)
        x.ipa = ipa
        x.host = self._s2_host(leaf, ipa)
        x.avail = min(avail, S2_PAGE_SIZE - (ipa & S2_PAGE_MASK))
        x.allow = s1_allow & s2_allow
        return 0

    cdef int _stage1_bypass(self, uint64_t iova, Xlat *x, Fault *f) noexcept nogil:
        # The input address goes to stage 2 as the IPA; one beyond the IAS is a stage-1
        # Address Size fault (IHI 0070 3.4).
        if iova >> SMMU_OAS_BITS:
            return stage1_fault(f, F_ADDR_SIZE, True)
        x.has_asid = False
        return self._output(iova, <uint16_t>-1, S2_PAGE_SIZE - (iova & S2_PAGE_MASK), True, x, f)

    cdef int _walk_map(self, Stream *s, int32_t ssid, uint64_t iova, Xlat *x,
                       Fault *f) noexcept nogil:
        cdef const MapEntry *m
        cdef uint64_t ipa, page = iova & ~<uint64_t>S2_PAGE_MASK
        if ssid >= 0:
            return config_fault(f, C_BAD_SUBSTREAMID)  # one address space, as S1CDMax = 0
        m = map_lookup(s.map, iova)
        if m == NULL:
            return stage1_fault(f, F_TRANSLATION, True)
        ipa = m.phys_start + (iova - m.virt_start)
        if ipa < m.phys_start or ipa >> SMMU_OAS_BITS:
            return stage1_fault(f, F_ADDR_SIZE, True)
        x.asid = s.map_asid
        x.has_asid = True
        x.map_generation = &s.map.generation
        # Cache whole pages only: a mapping that covers part of a page, or maps it across
        # two IPA pages, is translated anew each time.
        x.cacheable = (m.virt_start <= page and m.virt_end - page >= S2_PAGE_MASK
                       and (ipa & S2_PAGE_MASK) == (iova & S2_PAGE_MASK))
        return self._output(ipa, RW_ALLOW[rw_index(m.flags & VIRTIO_IOMMU_MAP_F_READ,
                                                   m.flags & VIRTIO_IOMMU_MAP_F_WRITE)],
                            min(m.virt_end - iova, S2_PAGE_MASK - (iova & S2_PAGE_MASK)) + 1,
                            True, x, f)

    cdef int _find_cd(self, uint64_t ste0, uint32_t index, uint64_t *cd_ipa,
                      Fault *f) noexcept nogil:
        """The IPA of CD `index` in the table S1ContextPtr points at (linear or 2-level)."""
        cdef uint64_t base = addr_field(ste0, STE_0_S1CONTEXTPTR_MSB, STE_0_S1CONTEXTPTR_LSB)
        cdef uint64_t fmt = field(ste0, STE_0_S1FMT_MSB, STE_0_S1FMT_LSB)
        cdef int split
        cdef const uint8_t *l1
        cdef uint64_t l1cd
        if field(ste0, STE_0_S1CDMAX_MSB, STE_0_S1CDMAX_LSB) == 0 or fmt == STRTAB_STE_0_S1FMT_LINEAR:
            cd_ipa[0] = base + <uint64_t>index * CTXDESC_CD_SIZE
            return 0
        split = CTXDESC_SPLIT_4K if fmt == STRTAB_STE_0_S1FMT_4K_L2 else CTXDESC_SPLIT_64K
        l1 = self._fetch(base + (index >> split) * CTXDESC_L1_DESC_SIZE, CLASS_CD, f)
        if l1 == NULL:
            return -1
        l1cd = rd64(l1)
        if not bit(l1cd, CTXDESC_L1_DESC_V):
            return config_fault(f, C_BAD_SUBSTREAMID)
        cd_ipa[0] = (addr_field(l1cd, CTXDESC_L1_DESC_L2PTR_MSB, CTXDESC_L1_DESC_L2PTR_LSB)
                     + (index & ((1 << split) - 1)) * CTXDESC_CD_SIZE)
        return 0

    cdef int _check_ste(self, uint64_t ste0, uint64_t ste1, Fault *f) noexcept nogil:
        """0 for a usable stage-1 STE; else the fault (C_BAD_STE, or a silent abort).
        Config values 1-3 are reserved; 6 and 7 ask for a stage 2, which belongs to the
        host (as iommufd's vSTE check, which accepts abort, bypass and S1 only)."""
        cdef uint64_t config = field(ste0, STE_0_CONFIG_MSB, STE_0_CONFIG_LSB)
        cdef uint64_t cdmax = field(ste0, STE_0_S1CDMAX_MSB, STE_0_S1CDMAX_LSB)
        if not bit(ste0, STE_0_V):
            return config_fault(f, C_BAD_STE)
        if config == STRTAB_STE_0_CFG_ABORT:
            f.recorded = False  # "report abort to device, no event recorded"
            return -1
        if config != STRTAB_STE_0_CFG_S1_TRANS and config != STRTAB_STE_0_CFG_BYPASS:
            return config_fault(f, C_BAD_STE)
        if config == STRTAB_STE_0_CFG_BYPASS:
            return 0
        if bit(ste1, STE_1_S1STALLD) or cdmax > SMMU_SSIDSIZE:
            return config_fault(f, C_BAD_STE)  # no stall model; SSIDs are 20 bits
        if cdmax and (field(ste0, STE_0_S1FMT_MSB, STE_0_S1FMT_LSB) > STRTAB_STE_0_S1FMT_64K_L2
                      or field(ste1, STE_1_S1DSS_MSB, STE_1_S1DSS_LSB) > STRTAB_STE_1_S1DSS_SSID0):
            return config_fault(f, C_BAD_STE)
        return 0

    cdef int _walk_table(self, Stream *s, int32_t ssid, uint64_t iova, Xlat *x,
                         Fault *f) noexcept nogil:
        cdef uint64_t cdmax = field(s.ste0, STE_0_S1CDMAX_MSB, STE_0_S1CDMAX_LSB)
        cdef uint64_t dss = field(s.ste1, STE_1_S1DSS_MSB, STE_1_S1DSS_LSB)
        cdef uint64_t cd_ipa
        cdef const uint8_t *raw
        cdef CDInfo cd
        cdef S1Leaf leaf
        if self._check_ste(s.ste0, s.ste1, f) != 0:
            return -1
        if field(s.ste0, STE_0_CONFIG_MSB, STE_0_CONFIG_LSB) == STRTAB_STE_0_CFG_BYPASS:
            if ssid >= 0:
                return config_fault(f, C_BAD_SUBSTREAMID)  # substreams need stage 1
            return self._stage1_bypass(iova, x, f)
        if ssid < 0 and cdmax and dss == STRTAB_STE_1_S1DSS_TERMINATE:
            return config_fault(f, F_STREAM_DISABLED)
        if ssid < 0 and cdmax and dss == STRTAB_STE_1_S1DSS_BYPASS:
            return self._stage1_bypass(iova, x, f)
        if ssid >= 0 and (cdmax == 0 or ssid >> cdmax
                          or (ssid == 0 and dss == STRTAB_STE_1_S1DSS_SSID0)):
            return config_fault(f, C_BAD_SUBSTREAMID)  # SSID 0 is the no-SSID CD's
        if self._find_cd(s.ste0, max(ssid, 0), &cd_ipa, f) != 0:
            return -1
        raw = self._fetch(cd_ipa, CLASS_CD, f)
        if raw == NULL:
            return -1
        if decode_cd(raw, &cd) != 0:
            return config_fault(f, C_BAD_CD)
        if self._walk_stage1(&cd, iova, &leaf, f) != 0:
            return -1
        x.asid = cd.asid
        x.has_asid = True
        return self._output(leaf.ipa, leaf.allow, S2_PAGE_SIZE - (iova & S2_PAGE_MASK),
                            cd.record, x, f)

    cdef int _walk_stage1(self, const CDInfo *cd, uint64_t iova, S1Leaf *out,
                          Fault *f) noexcept nogil:
        """VMSAv8-64 stage-1 walk (Arm ARM D8.2). Faults come in the architecture's
        priority: translation, address size, access flag; permission is left to _output."""
        cdef int half = bit(iova, 55)    # TTB1 covers the top of the address space
        cdef int va_bits = 64 - cd.tsz[half]
        cdef int top = 56 if cd.tbi[half] else 64   # TBI: the top byte takes no part
        cdef int g = cd.granule[half], stride = cd.granule[half] - 3
        cdef int level, nbits, shift
        cdef uint64_t base, desc, oa
        cdef const uint8_t *p
        cdef uint32_t hier = 0    # APTable/XNTable bits collected on the way down
        if cd.epd[half]:
            return stage1_fault(f, F_TRANSLATION, cd.record)
        if field(iova, top - 1, va_bits) != (field(<uint64_t>-1, top - 1, va_bits) if half else 0):
            return stage1_fault(f, F_TRANSLATION, cd.record)  # outside both TTB ranges
        level = 4 - (va_bits - g + stride - 1) // stride    # enough levels for va_bits
        nbits = va_bits - g - stride * (3 - level)          # index bits at the first level
        base = cd.ttb[half] & ~((<uint64_t>8 << nbits) - 1)  # tables are aligned to size
        while True:
            shift = g + stride * (3 - level)
            p = self._fetch(base + 8 * field(iova, shift + nbits - 1, shift), CLASS_TT, f)
            if p == NULL:
                return -1
            desc = rd64(p)
            if not bit(desc, DESC_VALID):
                return stage1_fault(f, F_TRANSLATION, cd.record)
            if level < 3 and bit(desc, DESC_TYPE):
                base = addr_field(desc, DESC_OA_MSB, g)
                if base >> cd.oas:
                    return stage1_fault(f, F_ADDR_SIZE, cd.record)
                if not cd.had[half]:
                    hier |= (bit(desc, DESC_APTABLE1) | bit(desc, DESC_APTABLE0) << 1
                             | bit(desc, DESC_PXNTABLE) << 2 | bit(desc, DESC_UXNTABLE) << 3)
                level += 1
                nbits = stride
                continue
            if level == 3 and not bit(desc, DESC_TYPE):
                return stage1_fault(f, F_TRANSLATION, cd.record)  # reserved encoding
            if level < 3 and not block_allowed(g, level):
                return stage1_fault(f, F_TRANSLATION, cd.record)
            oa = addr_field(desc, DESC_OA_MSB, shift)
            if oa >> cd.oas:
                return stage1_fault(f, F_ADDR_SIZE, cd.record)
            if not bit(desc, DESC_AF) and not cd.affd:
                return stage1_fault(f, F_ACCESS, cd.record)
            out.ipa = oa | field(iova, shift - 1, 0)
            out.allow = VMSA_ALLOW[
                (bit(desc, DESC_AP2) | (hier & 1))
                | (bit(desc, DESC_AP1) and not (hier & 2)) << 1
                | (bit(desc, DESC_PXN) | ((hier >> 2) & 1)) << 2
                | (bit(desc, DESC_UXN) | ((hier >> 3) & 1)) << 3]
            return 0

    cdef int _walk(self, uint32_t sid, int32_t ssid, uint64_t iova, uint32_t access,
                   Xlat *x, Fault *f) noexcept nogil:
        """Translate without the IOTLB: 0 and x, or -1 and f."""
        cdef Stream *s = self._find_stream(sid)
        cdef int rc
        fault_init(f, sid, ssid, iova, access)
        memset(x, 0, sizeof(Xlat))
        x.cacheable = True
        x.map_generation = &NO_MAP_GENERATION
        if s == NULL:
            return config_fault(f, C_BAD_STREAMID)
        if s.sticky:
            f[0] = s.sticky_fault
            return -1
        if s.mode == MODE_BLOCKED:
            rc = config_fault(f, F_STREAM_DISABLED)
        elif s.mode == MODE_BYPASS:
            rc = config_fault(f, C_BAD_SUBSTREAMID) if ssid >= 0 else self._stage1_bypass(iova, x, f)
        elif s.mode == MODE_MAP:
            rc = self._walk_map(s, ssid, iova, x, f)
        else:
            rc = self._walk_table(s, ssid, iova, x, f)
        if rc != 0 and f.recorded and is_config_event(f.event_id):
            s.sticky = True
            s.sticky_fault = f[0]
            self._flush_stream(sid)
        return rc

    cdef uint8_t *translate_c(self, uint32_t sid, int32_t ssid, uint64_t iova, uint32_t access,
                              uint64_t *gpa, uint64_t *avail, Fault *fault) noexcept nogil:
        """Host address of `iova` for one access (READ/WRITE/EXEC, optionally PRIV), valid
        for `avail[0]` bytes; NULL with `fault` filled otherwise (fault.recorded False: the
        transaction is terminated without an event). `gpa[0]` gets the guest-physical
        address. An IOTLB hit costs a hash, a 4-way tag compare and a shift."""
        cdef TlbEntry *e
        cdef Xlat x
        cdef uint64_t offset = iova & S2_PAGE_MASK, page = iova >> S2_PAGE_SHIFT
        if not self._layout_current():
            self._build_stage2()  # the memory table changed: never use stale host addresses
        if self.tlb != NULL:
            e = self._tlb_find(self._tlb_set(sid, ssid, page), sid, ssid, page)
            if (e != NULL and e.map_generation[0] == e.map_generation_seen
                    and (e.allow >> access) & 1):
                self.iotlb_hits += 1
                gpa[0] = e.ipa_page | offset
                avail[0] = S2_PAGE_SIZE - offset
                return e.host_page + offset
        self.iotlb_misses += 1
        if self._walk(sid, ssid, iova, access, &x, fault) != 0:
            return NULL
        if self.tlb != NULL and x.cacheable:
            self._fill(sid, ssid, iova, &x)
        gpa[0] = x.ipa
        avail[0] = x.avail
        return x.host

    # --- Python API: configuration ----------------------------------------------------------

    def set_stream_bypass(self, uint32_t sid) -> None:
        """Stage 1 bypassed: the IOVA is the IPA (stage 2 still applies)."""
        self._configure(sid, MODE_BYPASS)

    def set_stream_blocked(self, uint32_t sid) -> None:
        """Every access faults with F_STREAM_DISABLED."""
        self._configure(sid, MODE_BLOCKED)

    def set_stream_map(self, uint32_t sid, MappingTable table not None, uint32_t asid) -> None:
        """Stage 1 from a MAP/UNMAP domain's table (flags READ=1, WRITE=2). `asid` tags the
        stream's IOTLB entries for invalidate_asid (a domain ID will do). Removing a mapping
        from the table drops cached translations of it by itself, as UNMAP requires."""
        cdef Stream *s = self._configure(sid, MODE_MAP)
        s.map = table.data
        s.map_asid = asid
        self._tables[sid] = table

    def set_stream_table(self, uint32_t sid, uint64_t ste0, uint64_t ste1) -> None:
        """Page-table mode: STE dwords 0 and 1 as iommufd's iommu_hwpt_arm_smmuv3 carries
        them (V, Config, S1Fmt, S1ContextPtr, S1CDMax; S1DSS, S1STALLD). Checked at access
        time, as hardware does: a bad STE shows as C_BAD_STE on the first DMA."""
        cdef Stream *s = self._configure(sid, MODE_TABLE)
        s.ste0 = ste0
        s.ste1 = ste1

    def clear_stream(self, uint32_t sid) -> bool:
        """Forget the stream (its accesses then fault with C_BAD_STREAMID); False if unknown."""
        cdef Stream *s = self._find_stream(sid)
        cdef size_t i
        if s == NULL:
            return False
        i = s - self.streams
        memmove(s, s + 1, (self.nstreams - i - 1) * sizeof(Stream))
        self.nstreams -= 1
        self._tables.pop(sid, None)
        self._flush_stream(sid)
        return True

    def stream_sids(self) -> list:
        return [self.streams[i].sid for i in range(self.nstreams)]

    # --- Python API: stage 2 ------------------------------------------------------------------

    def s2_set_perm(self, uint64_t ipa, uint64_t size, bint read, bint write) -> int:
        """Change the host's permissions on every guest-RAM page that [ipa, ipa+size)
        touches: revoke with read=write=False, write-protect with read=True, write=False.
        Returns the number of RAM pages affected."""
        cdef S2Op op
        cdef S2Op *grown
        cdef size_t cap
        if size == 0 or ipa + size - 1 < ipa:
            raise ValueError(f"bad stage-2 range ipa={ipa:#x} size={size:#x}")
        op.first_page = ipa >> S2_PAGE_SHIFT
        op.last_page = (ipa + size - 1) >> S2_PAGE_SHIFT
        op.perm = (S2_READ if read else 0) | (S2_WRITE if write else 0)
        if self.s2_nops == self.s2_ops_cap:
            cap = max(8, 2 * self.s2_ops_cap)
            grown = <S2Op *>realloc(self.s2_ops, cap * sizeof(S2Op))
            if grown == NULL:
                raise MemoryError()
            self.s2_ops = grown
            self.s2_ops_cap = cap
        self.s2_ops[self.s2_nops] = op
        self.s2_nops += 1
        if not self._layout_current():
            self._build_stage2()  # replays the ops kept so far, this one included
            return self._apply_s2_op(&op)
        self._flush_all()
        return self._apply_s2_op(&op)

    def s2_reset(self) -> None:
        """Drop the overlay: every guest-RAM page readable and writable again. Stage 2 is
        also rebuilt by itself whenever the memory table changes."""
        self.s2_nops = 0
        if self._build_stage2() != 0:
            raise MemoryError()

    def s2_perm(self, uint64_t ipa):
        """(read, write) of the stage-2 page holding `ipa`, or None outside guest RAM."""
        cdef uint16_t leaf
        if not self._layout_current():
            self._build_stage2()
        leaf = self._s2_page(ipa)
        if not leaf & S2_VALID:
            return None
        return bool(leaf & S2_READ), bool(leaf & S2_WRITE)

    # --- Python API: invalidation ------------------------------------------------------------

    def invalidate_all(self) -> None:
        self._flush_all()

    def invalidate_stream(self, uint32_t sid) -> None:
        self._flush_stream(sid)

    def invalidate_asid(self, uint32_t asid) -> None:
        """Entries tagged with `asid`: a CD's ASID, or a MAP stream's `asid`."""
        self._flush_matching(0, False, asid, True, 0, <uint64_t>-1)

    def invalidate_range(self, uint32_t sid, uint64_t iova, uint64_t size) -> None:
        """The stream's entries for pages touching [iova, iova+size), every SSID."""
        cdef uint64_t last = iova + size - 1
        if size == 0:
            return
        if last < iova:
            last = <uint64_t>-1  # to the top of the address space
        self._flush_matching(sid, True, 0, False, iova >> S2_PAGE_SHIFT, last >> S2_PAGE_SHIFT)

    # --- Python API: translation -------------------------------------------------------------

    def translate(self, uint32_t sid, int ssid, uint64_t iova, uint64_t size, int access):
        """Translate the access [iova, iova+size) for `access` (READ/WRITE/EXEC | PRIV);
        `ssid` -1 means no SubstreamID.

        Returns (gpa, None): the guest-physical address of `iova`. Only the 4 KiB page
        holding `iova` is translated (and, for a MAP mapping that ends inside it, only up
        to the mapping's end): callers split larger accesses, as dma_read/dma_write do.
        Returns (None, record), record the 32-byte SMMUv3 event; or (None, None) when the
        architecture terminates the access without an event (STE.Config = abort; a stage-1
        fault under CD.R = 0).
        """
        cdef uint64_t gpa, avail
        cdef Fault f
        _check_access(ssid, access)
        if size == 0:
            raise ValueError("size must be at least 1")
        if self.translate_c(sid, ssid, iova, access, &gpa, &avail, &f) != NULL:
            return gpa, None
        return None, fault_record(&f) if f.recorded else None

    def dma_read(self, uint32_t sid, int ssid, uint64_t iova, Py_ssize_t n, int flags=0):
        """Read n bytes at iova page by page: (data, None), or (None, record) for the first
        fault ((None, None) if it records no event). `flags` may add EXEC and PRIV."""
        cdef uint64_t gpa, avail, chunk
        cdef Py_ssize_t done = 0
        cdef uint8_t *host
        cdef Fault f
        cdef bytearray out
        cdef uint8_t[::1] dst
        _check_flags(flags, ACC_EXEC | ACC_PRIV)
        _check_access(ssid, ACC_READ | flags)
        if n <= 0:
            return b"", None
        out = bytearray(n)
        dst = out
        while done < n:
            host = self.translate_c(sid, ssid, iova + done, ACC_READ | flags, &gpa, &avail, &f)
            if host == NULL:
                return None, fault_record(&f) if f.recorded else None
            chunk = min(avail, <uint64_t>(n - done))
            memcpy(&dst[done], host, chunk)
            done += chunk
        return bytes(out), None

    def dma_write(self, uint32_t sid, int ssid, uint64_t iova, const uint8_t[::1] data not None,
                  int flags=0):
        """Write data at iova page by page: (len(data), None), or (None, record) for the
        first fault; pages before the faulting one are written, as a real DMA would.
        `flags` may add PRIV."""
        cdef uint64_t gpa, avail, chunk
        cdef Py_ssize_t done = 0, n = data.shape[0]
        cdef uint8_t *host
        cdef Fault f
        _check_flags(flags, ACC_PRIV)
        _check_access(ssid, ACC_WRITE | flags)
        while done < n:
            host = self.translate_c(sid, ssid, iova + done, ACC_WRITE | flags, &gpa, &avail, &f)
            if host == NULL:
                return None, fault_record(&f) if f.recorded else None
            chunk = min(avail, <uint64_t>(n - done))
            memcpy(host, &data[done], chunk)
            done += chunk
        return n, None

    def dma_copy(self, uint32_t sid, int ssid, uint64_t src, uint64_t dst, uint64_t n):
        """A device's memory-to-memory copy of n bytes, both sides translated, page by page
        with no intermediate buffer: (n, None, 0, False) when done, else (bytes copied,
        record or None, IOVA of the first byte not reached, whether that was the write)."""
        cdef uint64_t sgpa, savail, dgpa, davail, chunk, done = 0
        cdef uint8_t *shost
        cdef uint8_t *dhost
        cdef Fault f
        _check_access(ssid, ACC_WRITE)
        while done < n:
            shost = self.translate_c(sid, ssid, src + done, ACC_READ, &sgpa, &savail, &f)
            if shost == NULL:
                return done, fault_record(&f) if f.recorded else None, src + done, False
            dhost = self.translate_c(sid, ssid, dst + done, ACC_WRITE, &dgpa, &davail, &f)
            if dhost == NULL:
                return done, fault_record(&f) if f.recorded else None, dst + done, True
            chunk = min(savail, davail, n - done)
            memmove(dhost, shost, chunk)
            done += chunk
        return n, None, 0, False

    def _bench_translate_c(self, uint32_t sid, int ssid, const uint64_t[::1] iovas not None,
                           int access, int repeat) -> int:
        """Benchmark hook: translate every iova `repeat` times in C, without the GIL;
        returns how many succeeded."""
        cdef uint64_t gpa, avail, ok = 0
        cdef Py_ssize_t i, n = iovas.shape[0]
        cdef int r
        cdef Fault f
        _check_access(ssid, access)
        with nogil:
            for r in range(repeat):
                for i in range(n):
                    if self.translate_c(sid, ssid, iovas[i], access, &gpa, &avail, &f) != NULL:
                        ok += 1
        return ok


cdef void _check_access(int ssid, int access) except *:
    if not -1 <= ssid < (1 << SMMU_SSIDSIZE):
        raise ValueError(f"ssid must be -1 (none) or below 2**{SMMU_SSIDSIZE}, not {ssid}")
    if access & ~(ACC_READ | ACC_WRITE | ACC_EXEC | ACC_PRIV) or not access & (
            ACC_READ | ACC_WRITE | ACC_EXEC):
        raise ValueError(f"access {access:#x} must combine READ, WRITE or EXEC (and PRIV) "
                         f"from viommu._dataplane")


cdef void _check_flags(int flags, int allowed) except *:
    if flags & ~allowed:
        raise ValueError(f"flags {flags:#x}: only {allowed:#x} (EXEC/PRIV) may be added here")
