# Arm SMMUv3 structures as viommu's stage 1 reads them and event records as it writes them
# (Arm IHI 0070 "SMMU architecture specification, SMMUv3": 5.2 STE, 5.4 CD, 5.4.1 L1CD,
# 7.3 event records), and the VMSAv8-64 stage-1 descriptors the CD's tables hold (Arm ARM
# D8.3). Names are Linux's (drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.h: STRTAB_STE_*,
# CTXDESC_*, EVTQ_*) and the architecture's (event type and CLASS names); fields are given
# as [msb:lsb] bit positions within a 64-bit dword, the architecture's notation.
#
# Included by viommu/_dataplane.pxd: the `cpdef enum`s are exported to Python too, so the
# pure-Python reference walk, the test builders and viommu.events.smmuv3 use these very
# definitions.

from libc.stdint cimport uint64_t

# --- Stream table entry, dwords 0 and 1 (IHI 0070 5.2) ---------------------------------------
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

# --- Context descriptors (IHI 0070 5.4) and the level-1 CD table (5.4.1) ---------------------
cpdef enum:
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

# --- VMSAv8-64 stage-1 translation table descriptors (Arm ARM D8.3) --------------------------
cpdef enum:
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

# --- Event records (IHI 0070 7.3) ------------------------------------------------------------
# Event type IDs, named as the architecture names them (Linux: EVT_ID_*).
cpdef enum EventId:
    F_UUT = 0x01
    C_BAD_STREAMID = 0x02
    F_STE_FETCH = 0x03
    C_BAD_STE = 0x04
    F_BAD_ATS_TREQ = 0x05
    F_STREAM_DISABLED = 0x06
    F_TRANSL_FORBIDDEN = 0x07
    C_BAD_SUBSTREAMID = 0x08
    F_CD_FETCH = 0x09
    C_BAD_CD = 0x0A
    F_WALK_EABT = 0x0B
    F_TRANSLATION = 0x10
    F_ADDR_SIZE = 0x11
    F_ACCESS = 0x12
    F_PERMISSION = 0x13
    F_TLB_CONFLICT = 0x20
    F_CFG_CONFLICT = 0x21
    E_PAGE_REQUEST = 0x24
    F_VMS_FETCH = 0x25

# CLASS: what the faulting access was for.
cpdef enum EventClass:
    CLASS_CD = 0          # a CD fetch
    CLASS_TT = 1          # a stage-1 translation table fetch
    CLASS_IN = 2          # the input address itself

cpdef enum:
    EVTQ_ENT_DWORDS = 4
    EVTQ_0_ID_MSB = 7
    EVTQ_0_ID_LSB = 0
    EVTQ_0_SSV = 11
    EVTQ_0_SSID_MSB = 31
    EVTQ_0_SSID_LSB = 12
    EVTQ_0_SID_MSB = 63
    EVTQ_0_SID_LSB = 32
    EVTQ_1_STAG_MSB = 15
    EVTQ_1_STAG_LSB = 0
    EVTQ_1_STALL = 31
    EVTQ_1_PnU = 33
    EVTQ_1_InD = 34
    EVTQ_1_RnW = 35
    EVTQ_1_S2 = 39
    EVTQ_1_CLASS_MSB = 41
    EVTQ_1_CLASS_LSB = 40
    EVTQ_1_TT_READ = 44
    EVTQ_2_ADDR_MSB = 63      # InputAddr: the whole dword
    EVTQ_2_ADDR_LSB = 0
    EVTQ_3_IPA_MSB = 51
    EVTQ_3_IPA_LSB = 12
    EVTQ_3_FETCH_ADDR_MSB = 51
    EVTQ_3_FETCH_ADDR_LSB = 3
    # E_PAGE_REQUEST (IHI 0070 7.3, "E_PAGE_REQUEST") has a layout of its own: the span of
    # the hinted access in 4 KiB pages, the accesses it anticipates for each privilege
    # level, and InputAddr[63:12] (bits 11:0 of dword 2 are RES0).
    EVTQ_1_SPAN_MSB = 51
    EVTQ_1_SPAN_LSB = 44
    EVTQ_1_PR = 39
    EVTQ_1_PW = 38
    EVTQ_1_PX = 37
    EVTQ_1_UR = 35
    EVTQ_1_UW = 34
    EVTQ_1_UX = 33
    EVTQ_2_PAGE_ADDR_LSB = 12

# The accesses an E_PAGE_REQUEST anticipates, named as the architecture names its flags
# (privileged / unprivileged read, write, execute), as one bit mask (EventRecord.page_hints).
cpdef enum PageHint:
    PAGE_HINT_PR = 1 << 0
    PAGE_HINT_PW = 1 << 1
    PAGE_HINT_PX = 1 << 2
    PAGE_HINT_UR = 1 << 3
    PAGE_HINT_UW = 1 << 4
    PAGE_HINT_UX = 1 << 5

# One record as the event queue holds it, and as iommufd's vEVENTQ hands it over
# (include/uapi/linux/iommufd.h).
cdef struct iommu_vevent_arm_smmuv3:
    uint64_t evt[EVTQ_ENT_DWORDS]
