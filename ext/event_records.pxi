# Event records, written and read in one place: SMMUv3 event queue records (IHI 0070 7.3,
# uapi/smmuv3.pxd) from the engine's faults and for viommu.events.smmuv3.EventRecord, which
# event types carry which fields, and the virtio-iommu fault records the eventq carries
# (virtio spec 5.13.6, "Fault reporting"; uapi/virtio_iommu.pxd).

# --- what each SMMUv3 event type carries (IHI 0070 7.3, one record format per type) ------------

cdef inline bint evt_has_input_addr(uint8_t event_id) noexcept nogil:
    """The record carries InputAddr, with RnW, InD, PnU, S2, CLASS and TTRnW: the faults of
    an input transaction's translation."""
    return (event_id == F_UUT or event_id == F_BAD_ATS_TREQ or event_id == F_TRANSL_FORBIDDEN
            or event_id == F_WALK_EABT or F_TRANSLATION <= event_id <= F_PERMISSION)

cdef inline bint evt_has_fetch_addr(uint8_t event_id) noexcept nogil:
    """DW3 holds FetchAddr (else the IPA): fetches of configuration, and a walk's abort."""
    return (event_id == F_STE_FETCH or event_id == F_CD_FETCH or event_id == F_VMS_FETCH
            or event_id == F_WALK_EABT)

cdef inline bint evt_is_config_error(uint8_t event_id) noexcept nogil:
    """A configuration error: it stays until the stream is reprogrammed, as on hardware."""
    return event_id == C_BAD_STE or event_id == C_BAD_CD or event_id == C_BAD_SUBSTREAMID


def event_has_input_addr(uint8_t event_id) -> bool:
    return evt_has_input_addr(event_id)

def event_has_fetch_addr(uint8_t event_id) -> bool:
    return evt_has_fetch_addr(event_id)

def event_is_config_error(uint8_t event_id) -> bool:
    return evt_is_config_error(event_id)


# --- the record's fields --------------------------------------------------------------------------

cdef struct EventFields:        # viommu.events.smmuv3.EventRecord's fields, same names
    uint8_t event_id
    uint32_t sid
    uint32_t ssid
    bint ssv
    uint16_t stag
    bint stall
    bint pnu                    # privileged
    bint ind                    # instruction fetch
    bint rnw                    # read
    bint s2
    uint8_t event_class         # EventClass
    bint ttrnw
    uint64_t address            # InputAddr
    uint64_t ipa                # DW3, for events without FetchAddr
    uint64_t fetch_addr         # DW3, for events with it
    # E_PAGE_REQUEST only, which has no other field of dword 1 (and no dword 3)
    uint8_t span                # the hinted span, in 4 KiB pages
    uint8_t hints               # PageHint bits: the accesses anticipated

# Where each PageHint (uapi/smmuv3.pxd) of EventFields.hints is in dword 1 of the record.
cdef int[6] PAGE_HINT_BITS = [EVTQ_1_PR, EVTQ_1_PW, EVTQ_1_PX, EVTQ_1_UR, EVTQ_1_UW, EVTQ_1_UX]

cdef void page_request_encode(const EventFields *e, iommu_vevent_arm_smmuv3 *r) noexcept nogil:
    cdef int i
    r.evt[1] = set_field(e.span, EVTQ_1_SPAN_MSB, EVTQ_1_SPAN_LSB)
    for i in range(6):
        if e.hints & (1 << i):
            r.evt[1] |= <uint64_t>1 << PAGE_HINT_BITS[i]
    r.evt[2] = e.address & ~((<uint64_t>1 << EVTQ_2_PAGE_ADDR_LSB) - 1)
    r.evt[3] = 0

cdef void page_request_decode(const iommu_vevent_arm_smmuv3 *r, EventFields *e) noexcept nogil:
    cdef int i
    e.span = field(r.evt[1], EVTQ_1_SPAN_MSB, EVTQ_1_SPAN_LSB)
    e.hints = 0
    for i in range(6):
        if bit(r.evt[1], PAGE_HINT_BITS[i]):
            e.hints |= 1 << i
    e.address = r.evt[2] & ~((<uint64_t>1 << EVTQ_2_PAGE_ADDR_LSB) - 1)

cdef void evtq_encode(const EventFields *e, iommu_vevent_arm_smmuv3 *r) noexcept nogil:
    r.evt[0] = (set_field(e.event_id, EVTQ_0_ID_MSB, EVTQ_0_ID_LSB)
                | (<uint64_t>e.ssv << EVTQ_0_SSV)
                | set_field(e.ssid, EVTQ_0_SSID_MSB, EVTQ_0_SSID_LSB)
                | set_field(e.sid, EVTQ_0_SID_MSB, EVTQ_0_SID_LSB))
    r.evt[1] = (set_field(e.stag, EVTQ_1_STAG_MSB, EVTQ_1_STAG_LSB)
                | (<uint64_t>e.stall << EVTQ_1_STALL)
                | (<uint64_t>e.pnu << EVTQ_1_PnU)
                | (<uint64_t>e.ind << EVTQ_1_InD)
                | (<uint64_t>e.rnw << EVTQ_1_RnW)
                | (<uint64_t>e.s2 << EVTQ_1_S2)
                | set_field(e.event_class, EVTQ_1_CLASS_MSB, EVTQ_1_CLASS_LSB)
                | (<uint64_t>e.ttrnw << EVTQ_1_TT_READ))
    r.evt[2] = e.address
    r.evt[3] = (addr_field(e.ipa, EVTQ_3_IPA_MSB, EVTQ_3_IPA_LSB)
                | addr_field(e.fetch_addr, EVTQ_3_FETCH_ADDR_MSB, EVTQ_3_FETCH_ADDR_LSB))
    if e.event_id == E_PAGE_REQUEST:
        page_request_encode(e, r)

cdef void evtq_decode(const iommu_vevent_arm_smmuv3 *r, EventFields *e) noexcept nogil:
    e.event_id = field(r.evt[0], EVTQ_0_ID_MSB, EVTQ_0_ID_LSB)
    e.ssv = bit(r.evt[0], EVTQ_0_SSV)
    e.ssid = field(r.evt[0], EVTQ_0_SSID_MSB, EVTQ_0_SSID_LSB)
    e.sid = field(r.evt[0], EVTQ_0_SID_MSB, EVTQ_0_SID_LSB)
    e.stag = field(r.evt[1], EVTQ_1_STAG_MSB, EVTQ_1_STAG_LSB)
    e.stall = bit(r.evt[1], EVTQ_1_STALL)
    e.pnu = bit(r.evt[1], EVTQ_1_PnU)
    e.ind = bit(r.evt[1], EVTQ_1_InD)
    e.rnw = bit(r.evt[1], EVTQ_1_RnW)
    e.s2 = bit(r.evt[1], EVTQ_1_S2)
    e.event_class = field(r.evt[1], EVTQ_1_CLASS_MSB, EVTQ_1_CLASS_LSB)
    e.ttrnw = bit(r.evt[1], EVTQ_1_TT_READ)
    e.address = r.evt[2]
    e.ipa = e.fetch_addr = 0
    e.span = e.hints = 0
    if e.event_id == E_PAGE_REQUEST:
        # dword 1 holds only the span and the hints: none of the fields read above
        e.stag = e.stall = e.pnu = e.ind = e.rnw = e.s2 = e.event_class = e.ttrnw = 0
        page_request_decode(r, e)
    elif evt_has_fetch_addr(e.event_id):
        e.fetch_addr = addr_field(r.evt[3], EVTQ_3_FETCH_ADDR_MSB, EVTQ_3_FETCH_ADDR_LSB)
    else:
        e.ipa = addr_field(r.evt[3], EVTQ_3_IPA_MSB, EVTQ_3_IPA_LSB)


EVENT_RECORD_SIZE = sizeof(iommu_vevent_arm_smmuv3)

def encode_event_record(record) -> bytes:
    """The 32-byte record of a viommu.events.smmuv3.EventRecord (its fields already
    checked to fit)."""
    cdef EventFields e
    cdef iommu_vevent_arm_smmuv3 r
    e.event_id, e.sid, e.ssid, e.ssv = record.event_id, record.sid, record.ssid, record.ssv
    e.stag, e.stall, e.pnu, e.ind = record.stag, record.stall, record.pnu, record.ind
    e.rnw, e.s2, e.event_class, e.ttrnw = record.rnw, record.s2, record.event_class, record.ttrnw
    e.address, e.ipa, e.fetch_addr = record.address, record.ipa, record.fetch_addr
    e.span, e.hints = record.span, record.page_hints
    evtq_encode(&e, &r)
    return (<char *>&r)[:sizeof(r)]

def decode_event_record(const uint8_t[::1] raw not None) -> dict:
    """A record's fields, as keyword arguments of EventRecord."""
    cdef EventFields e
    cdef iommu_vevent_arm_smmuv3 r
    if raw.shape[0] != sizeof(r):
        raise ValueError(f"an SMMUv3 event record is {sizeof(r)} bytes, got {raw.shape[0]}")
    memcpy(&r, &raw[0], sizeof(r))
    evtq_decode(&r, &e)
    return {"event_id": e.event_id, "sid": e.sid, "ssid": e.ssid, "ssv": e.ssv,
            "stag": e.stag, "stall": e.stall, "pnu": e.pnu, "ind": e.ind, "rnw": e.rnw,
            "s2": e.s2, "event_class": e.event_class, "ttrnw": e.ttrnw,
            "address": e.address, "ipa": e.ipa, "fetch_addr": e.fetch_addr,
            "span": e.span, "page_hints": e.hints}


# --- the engine's faults ----------------------------------------------------------------------------

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

cdef void fault_event(const Fault *f, EventFields *e) noexcept nogil:
    """The record's fields for a fault: those its event type carries."""
    cdef uint8_t t = f.event_id
    memset(e, 0, sizeof(EventFields))
    e.event_id = t
    e.sid = f.sid
    if t != F_STREAM_DISABLED and f.ssid >= 0:
        e.ssv = True
        e.ssid = f.ssid
    if evt_has_input_addr(t):
        e.pnu = (f.access & ACC_PRIV) != 0
        e.ind = f.access & ACC_EXEC and not f.access & ACC_WRITE
        e.rnw = not f.access & ACC_WRITE
        e.s2 = f.s2
        e.event_class = f.cls
        e.ttrnw = f.ttrnw
        e.address = f.iova
    if evt_has_input_addr(t) and f.s2:
        e.ipa = f.ipa
    elif evt_has_fetch_addr(t):
        e.fetch_addr = f.fetch_addr

cdef bytes fault_record(const Fault *f):
    cdef EventFields e
    cdef iommu_vevent_arm_smmuv3 r
    fault_event(f, &e)
    evtq_encode(&e, &r)
    return (<char *>&r)[:sizeof(r)]


# --- virtio-iommu fault records -------------------------------------------------------------------

FAULT_RECORD_SIZE = sizeof(virtio_iommu_fault)
EXT_FAULT_RECORD_SIZE = sizeof(virtio_iommu_fault_ext)

def encode_fault_record(uint8_t reason, uint32_t flags, uint32_t endpoint,
                        uint64_t address) -> bytes:
    """struct virtio_iommu_fault, reserved fields zero."""
    cdef virtio_iommu_fault f
    memset(&f, 0, sizeof(f))
    f.reason = reason
    f.flags = flags
    f.endpoint = endpoint
    f.address = address
    return (<char *>&f)[:sizeof(f)]

def encode_ext_fault_record(uint8_t reason, uint32_t flags, uint32_t endpoint, uint32_t pasid,
                            uint64_t address, uint16_t grpid) -> bytes:
    """viommu's extended fault record (virtio_iommu_fault_ext), reserved fields zero."""
    cdef virtio_iommu_fault_ext f
    memset(&f, 0, sizeof(f))
    f.reason = reason
    f.flags = flags
    f.endpoint = endpoint
    f.pasid = pasid
    f.address = address
    f.grpid = grpid
    return (<char *>&f)[:sizeof(f)]

def decode_fault_record(const uint8_t[::1] raw not None) -> tuple:
    """(reason, flags, endpoint, address) of a struct virtio_iommu_fault."""
    cdef virtio_iommu_fault f
    if raw.shape[0] != sizeof(f):
        raise ValueError(f"a fault record is {sizeof(f)} bytes, got {raw.shape[0]}")
    memcpy(&f, &raw[0], sizeof(f))
    return f.reason, f.flags, f.endpoint, f.address
