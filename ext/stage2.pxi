# Stage 2: the host's 4-level radix over guest RAM, rebuilt from the memory table whenever
# it changes, with an overlay of permission changes (s2_set_perm) replayed on each rebuild.
# Every stage-1 structure fetch and every output address goes through it, as on nested
# hardware: outside guest RAM a fetch aborts (F_CD_FETCH, F_WALK_EABT with FetchAddr) and an
# output IPA is a stage-2 F_TRANSLATION; overlay-revoked or read-only pages give stage-2
# F_PERMISSION.
#
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

cdef struct Stage2:
    S2Node *root
    Region layout[MAX_REGIONS]  # the memory table the tree was built from
    int nregions
    S2Op *ops                   # the overlay, in call order
    size_t nops
    size_t ops_cap


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

cdef void s2_destroy(Stage2 *s2) noexcept nogil:
    s2_free(s2.root, 0)
    free(s2.ops)
    s2.root = NULL
    s2.ops = NULL
    s2.nops = s2.ops_cap = 0


cdef int s2_map_region(Stage2 *s2, int index) noexcept nogil:
    # Whole pages only; a page already mapped by an earlier region keeps it, as
    # GuestMemory.gpa_ptr prefers the first region that contains an address.
    cdef Region *r = &s2.layout[index]
    cdef uint64_t ipa = (r.gpa + S2_PAGE_MASK) & ~<uint64_t>S2_PAGE_MASK
    cdef uint16_t *slot
    while ipa >= r.gpa and ipa - r.gpa + S2_PAGE_SIZE <= r.size:
        slot = s2_slot(s2.root, ipa, True)
        if slot == NULL:
            if ipa >> SMMU_OAS_BITS:
                return 0  # beyond the IPA size: stage 2 cannot map it
            return -1
        if slot[0] == 0:
            slot[0] = S2_VALID | S2_READ | S2_WRITE | (index << S2_REGION_SHIFT)
        ipa += S2_PAGE_SIZE
    return 0

cdef uint64_t s2_apply_op(Stage2 *s2, const S2Op *op) noexcept nogil:
    """Set the permissions of the RAM pages in the op's range; returns how many."""
    cdef uint64_t n = 0, page, first, last
    cdef uint16_t *slot
    cdef int i
    for i in range(s2.nregions):
        # only pages inside region i can hold its leaves: skip the holes of a huge range
        first = max(op.first_page, (s2.layout[i].gpa + S2_PAGE_MASK) >> S2_PAGE_SHIFT)
        last = min(op.last_page,
                   ((s2.layout[i].gpa + s2.layout[i].size) >> S2_PAGE_SHIFT) - 1)
        page = first
        while page <= last:
            slot = s2_slot(s2.root, page << S2_PAGE_SHIFT, False)
            if slot != NULL and slot[0] & S2_VALID and slot[0] >> S2_REGION_SHIFT == i:
                slot[0] = (slot[0] & ~<uint16_t>(S2_READ | S2_WRITE)) | op.perm
                n += 1
            page += 1
    return n

cdef int s2_build(Stage2 *s2, const Region *regions, int nregions) noexcept nogil:
    """(Re)build the tree from the memory table with full access, then replay the overlay.
    The caller drops cached translations."""
    cdef int i
    cdef size_t k
    s2_free(s2.root, 0)
    s2.root = <S2Node *>calloc(1, sizeof(S2Node))
    s2.nregions = nregions
    memcpy(s2.layout, regions, nregions * sizeof(Region))
    if s2.root == NULL:
        return -1
    for i in range(s2.nregions):
        if s2_map_region(s2, i) != 0:
            return -1
    for k in range(s2.nops):
        s2_apply_op(s2, &s2.ops[k])
    return 0

cdef int s2_keep_op(Stage2 *s2, const S2Op *op) noexcept nogil:
    """Add op to the overlay (applying it is the caller's); -1 when memory runs out."""
    cdef S2Op *grown
    cdef size_t cap
    if s2.nops == s2.ops_cap:
        cap = max(<size_t>8, 2 * s2.ops_cap)
        grown = <S2Op *>realloc(s2.ops, cap * sizeof(S2Op))
        if grown == NULL:
            return -1
        s2.ops = grown
        s2.ops_cap = cap
    s2.ops[s2.nops] = op[0]
    s2.nops += 1
    return 0


cdef inline bint s2_layout_current(const Stage2 *s2, const Region *regions,
                                   int nregions) noexcept nogil:
    return (s2.nregions == nregions
            and memcmp(s2.layout, regions, nregions * sizeof(Region)) == 0)

cdef inline uint16_t s2_page(const Stage2 *s2, uint64_t ipa) noexcept nogil:
    cdef uint16_t *slot = s2_slot(s2.root, ipa, False)
    return slot[0] if slot != NULL else 0

cdef inline uint8_t *s2_host(const Stage2 *s2, uint16_t leaf, uint64_t ipa) noexcept nogil:
    cdef const Region *r = &s2.layout[leaf >> S2_REGION_SHIFT]
    return r.host + (ipa - r.gpa)


cdef const uint8_t *s2_fetch(const Stage2 *s2, uint64_t ipa, uint8_t cls,
                             Fault *f) noexcept nogil:
    """A CD, L1CD or table descriptor read at `ipa`, through stage 2. Outside guest RAM
    nothing answers: the fetch aborts (F_CD_FETCH for configuration, F_WALK_EABT for
    tables)."""
    cdef uint16_t leaf = s2_page(s2, ipa)
    if not leaf & S2_VALID:
        if cls == CLASS_CD:
            fetch_fault(f, F_CD_FETCH, cls, ipa)
        else:
            fetch_fault(f, F_WALK_EABT, cls, ipa)
        return NULL
    if not leaf & S2_READ:
        stage2_fault(f, F_PERMISSION, cls, ipa)
        return NULL
    return s2_host(s2, leaf, ipa)

cdef int s2_output(const Stage2 *s2, uint64_t ipa, uint16_t s1_allow, uint64_t avail,
                   bint record_s1, Xlat *x, Fault *f) noexcept nogil:
    """Finish a translation whose stage 1 produced `ipa`: stage-1 permission, then stage 2
    for the output address (CLASS=IN)."""
    cdef uint16_t leaf, s2_allow
    if not (s1_allow >> f.access) & 1:
        return stage1_fault(f, F_PERMISSION, record_s1)
    leaf = s2_page(s2, ipa)
    if not leaf & S2_VALID:
        return stage2_fault(f, F_TRANSLATION, CLASS_IN, ipa)
    s2_allow = RW_ALLOW[rw_index(leaf & S2_READ, leaf & S2_WRITE)]
    if not (s2_allow >> f.access) & 1:
        return stage2_fault(f, F_PERMISSION, CLASS_IN, ipa)
    x.ipa = ipa
    x.host = s2_host(s2, leaf, ipa)
    x.avail = min(avail, S2_PAGE_SIZE - (ipa & S2_PAGE_MASK))
    x.allow = s1_allow & s2_allow
    return 0
