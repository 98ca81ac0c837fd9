# Stage 1, per stream mode: a MAP domain's table; the guest's own tables (STE -> CD ->
# VMSAv8-64 tables, Arm IHI 0070 5.2/5.4, Arm ARM D8.2); bypass; blocked. Every fetch and
# the output address go through stage 2 (stage2.pxi). Choices where the architecture leaves
# room are written where they are made; the main ones:
# - A guest STE may ask for abort, bypass or stage-1 translation only (stage 2 is the
#   host's); SubstreamIDs need stage 1 with S1CDMax > 0, else C_BAD_SUBSTREAMID; MAP-mode
#   streams behave as S1CDMax = 0.
# - One translation covers one 4 KiB page (stage 2's granule), whatever the stage-1 leaf.

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


cdef int walk_tables(const Stage2 *s2, const CDInfo *cd, uint64_t iova, S1Leaf *out,
                     Fault *f) noexcept nogil:
    """VMSAv8-64 stage-1 walk (Arm ARM D8.2). Faults come in the architecture's
    priority: translation, address size, access flag; permission is left to s2_output."""
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
        p = s2_fetch(s2, base + 8 * field(iova, shift + nbits - 1, shift), CLASS_TT, f)
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


cdef int find_cd(const Stage2 *s2, uint64_t ste0, uint32_t index, uint64_t *cd_ipa,
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
    l1 = s2_fetch(s2, base + (index >> split) * CTXDESC_L1_DESC_SIZE, CLASS_CD, f)
    if l1 == NULL:
        return -1
    l1cd = rd64(l1)
    if not bit(l1cd, CTXDESC_L1_DESC_V):
        return config_fault(f, C_BAD_SUBSTREAMID)
    cd_ipa[0] = (addr_field(l1cd, CTXDESC_L1_DESC_L2PTR_MSB, CTXDESC_L1_DESC_L2PTR_LSB)
                 + (index & ((1 << split) - 1)) * CTXDESC_CD_SIZE)
    return 0

cdef int check_ste(uint64_t ste0, uint64_t ste1, Fault *f) noexcept nogil:
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


cdef int stage1_bypass(const Stage2 *s2, uint64_t iova, Xlat *x, Fault *f) noexcept nogil:
    # The input address goes to stage 2 as the IPA; one beyond the IAS is a stage-1
    # Address Size fault (IHI 0070 3.4).
    if iova >> SMMU_OAS_BITS:
        return stage1_fault(f, F_ADDR_SIZE, True)
    x.has_asid = False
    return s2_output(s2, iova, <uint16_t>-1, S2_PAGE_SIZE - (iova & S2_PAGE_MASK), True, x, f)

cdef int walk_map(const Stage2 *s2, const Stream *s, int32_t ssid, uint64_t iova, Xlat *x,
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
    return s2_output(s2, ipa, RW_ALLOW[rw_index(m.flags & VIRTIO_IOMMU_MAP_F_READ,
                                                m.flags & VIRTIO_IOMMU_MAP_F_WRITE)],
                     min(m.virt_end - iova, S2_PAGE_MASK - (iova & S2_PAGE_MASK)) + 1,
                     True, x, f)

cdef int walk_table(const Stage2 *s2, const Stream *s, int32_t ssid, uint64_t iova, Xlat *x,
                    Fault *f) noexcept nogil:
    cdef uint64_t cdmax = field(s.ste0, STE_0_S1CDMAX_MSB, STE_0_S1CDMAX_LSB)
    cdef uint64_t dss = field(s.ste1, STE_1_S1DSS_MSB, STE_1_S1DSS_LSB)
    cdef uint64_t cd_ipa
    cdef const uint8_t *raw
    cdef CDInfo cd
    cdef S1Leaf leaf
    if check_ste(s.ste0, s.ste1, f) != 0:
        return -1
    if field(s.ste0, STE_0_CONFIG_MSB, STE_0_CONFIG_LSB) == STRTAB_STE_0_CFG_BYPASS:
        if ssid >= 0:
            return config_fault(f, C_BAD_SUBSTREAMID)  # substreams need stage 1
        return stage1_bypass(s2, iova, x, f)
    if ssid < 0 and cdmax and dss == STRTAB_STE_1_S1DSS_TERMINATE:
        return config_fault(f, F_STREAM_DISABLED)
    if ssid < 0 and cdmax and dss == STRTAB_STE_1_S1DSS_BYPASS:
        return stage1_bypass(s2, iova, x, f)
    if ssid >= 0 and (cdmax == 0 or ssid >> cdmax
                      or (ssid == 0 and dss == STRTAB_STE_1_S1DSS_SSID0)):
        return config_fault(f, C_BAD_SUBSTREAMID)  # SSID 0 is the no-SSID CD's
    if find_cd(s2, s.ste0, max(ssid, 0), &cd_ipa, f) != 0:
        return -1
    raw = s2_fetch(s2, cd_ipa, CLASS_CD, f)
    if raw == NULL:
        return -1
    if decode_cd(raw, &cd) != 0:
        return config_fault(f, C_BAD_CD)
    if walk_tables(s2, &cd, iova, &leaf, f) != 0:
        return -1
    x.asid = cd.asid
    x.has_asid = True
    return s2_output(s2, leaf.ipa, leaf.allow, S2_PAGE_SIZE - (iova & S2_PAGE_MASK),
                     cd.record, x, f)


cdef int walk_blocked(const Stage2 *s2, const Stream *s, int32_t ssid, uint64_t iova,
                      Xlat *x, Fault *f) noexcept nogil:
    return config_fault(f, F_STREAM_DISABLED)

cdef int walk_bypass(const Stage2 *s2, const Stream *s, int32_t ssid, uint64_t iova, Xlat *x,
                     Fault *f) noexcept nogil:
    if ssid >= 0:
        return config_fault(f, C_BAD_SUBSTREAMID)  # substreams need stage 1
    return stage1_bypass(s2, iova, x, f)


# One walker per stream mode, called through this table rather than a chain of ifs: each
# stays a function of its own, which keeps the MAP walk as fast as it was when the modes
# were Engine methods (inlined into one function, its binary search ran 1.5x slower).
ctypedef int (*stream_walker)(const Stage2 *s2, const Stream *s, int32_t ssid, uint64_t iova,
                              Xlat *x, Fault *f) noexcept nogil

cdef stream_walker STREAM_WALKERS[MODE_TABLE + 1]
STREAM_WALKERS[0] = walk_blocked               # never configured: not reached
STREAM_WALKERS[<int>MODE_BYPASS] = walk_bypass
STREAM_WALKERS[<int>MODE_BLOCKED] = walk_blocked
STREAM_WALKERS[<int>MODE_MAP] = walk_map
STREAM_WALKERS[<int>MODE_TABLE] = walk_table

cdef inline int walk_stream(const Stage2 *s2, const Stream *s, int32_t ssid, uint64_t iova,
                            Xlat *x, Fault *f) noexcept nogil:
    """Translate for a configured stream without the IOTLB: 0 and x, or -1 and f."""
    return STREAM_WALKERS[s.mode](s2, s, ssid, iova, x, f)
