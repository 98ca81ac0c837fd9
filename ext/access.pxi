# What a translation is: the access bits translate() takes, permissions as masks over
# access bit-sets, what this SMMU implements, and one translation's result (`Xlat`), shared
# by the stage-2 tree, the stage-1 walker, the IOTLB and the engine.

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


# --- what this SMMU implements (the SMMU_IDR* values it would advertise) --------------------
# Exported: the pure-Python reference walk uses these very values.
cpdef enum:
    SMMU_OAS_BITS = 48    # IDR5.OAS; also the IAS, the stage-2 input size
    SMMU_SSIDSIZE = 20    # IDR1.SSIDSIZE
    CD_TSZ_MIN = 16
    CD_TSZ_MAX = 39
    S2_PAGE_SHIFT = 12    # the host's stage 2 uses 4 KiB pages
    S2_LEVELS = 4
    S2_STRIDE = 9

cdef enum:
    S2_PAGE_SIZE = 1 << S2_PAGE_SHIFT
    S2_PAGE_MASK = S2_PAGE_SIZE - 1
    S2_ENTRIES = 1 << S2_STRIDE


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


# --- one successful translation ---------------------------------------------------------------

cdef uint64_t NO_MAP_GENERATION = 0    # what translations outside MAP tables point at

cdef struct Xlat:
    uint64_t ipa
    uint8_t *host
    uint64_t avail              # bytes from iova that share this translation
    uint16_t allow
    uint32_t asid
    bint has_asid
    bint cacheable
    const uint64_t *map_generation   # the MAP table's counter, or &NO_MAP_GENERATION
