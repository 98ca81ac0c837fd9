# virtio-iommu requests (virtio spec 5.13.6): a popped chain gathered into the request
# structs of uapi/virtio_iommu.pxd, decoded into a `Request` for Python, and its tail
# written back. The request thread (requestq.pxi) reads the same structs.

cdef enum:
    MAX_WRITABLE_SEGMENTS = 8
    # A request whose writable part is larger than this and a tail cannot be a
    # virtio-iommu request.
    MAX_WRITABLE_PAYLOAD = 65536


# The device-readable part of any request, read as the struct its type names.
cdef union RequestBytes:
    virtio_iommu_req_head head
    virtio_iommu_req_attach attach
    virtio_iommu_req_detach detach
    virtio_iommu_req_map map
    virtio_iommu_req_unmap unmap
    virtio_iommu_req_probe probe
    virtio_iommu_req_attach_table attach_table
    virtio_iommu_req_invalidate invalidate
    virtio_iommu_req_page_resp page_resp


# A popped chain as a request: its readable bytes (up to the largest request) and where
# its writable part lies.
cdef struct Chain:
    RequestBytes req
    uint32_t got                # bytes of req filled
    uint64_t readable
    uint64_t writable
    uint8_t *wseg_ptr[MAX_WRITABLE_SEGMENTS]
    uint32_t wseg_len[MAX_WRITABLE_SEGMENTS]
    unsigned int nwseg


cdef class Request:
    """One decoded virtio-iommu request. Fields the type does not have read as 0."""

    cdef VirtQueue vq
    cdef readonly uint16_t head
    cdef readonly uint8_t type
    cdef readonly uint32_t domain
    cdef readonly uint32_t endpoint
    cdef readonly uint32_t flags
    cdef readonly uint64_t virt_start
    cdef readonly uint64_t virt_end
    cdef readonly uint64_t phys_start
    cdef readonly bint reserved_zero
    # ATTACH_TABLE
    cdef readonly uint8_t format
    cdef readonly uint64_t ste0
    cdef readonly uint64_t ste1
    # INVALIDATE (flags above holds its flags)
    cdef readonly uint8_t scope
    cdef readonly uint8_t caches
    cdef readonly uint32_t pasid
    cdef readonly uint64_t arch_id
    cdef readonly uint64_t address
    cdef readonly uint64_t nr_pages
    cdef readonly uint8_t page_size
    # PAGE_RESP (flags above holds its flags; pasid above its PASID)
    cdef readonly uint16_t grpid
    cdef readonly uint16_t code
    cdef readonly uint32_t readable_len
    cdef readonly uint32_t writable_len
    cdef Chain chain

    @property
    def type_name(self) -> str:
        try:
            return RequestType(self.type).name.removeprefix("VIRTIO_IOMMU_T_")
        except ValueError:
            return f"type {self.type}"

    cdef uint32_t _complete(self, uint8_t status, const uint8_t[::1] payload) except? 0:
        """Write payload then tail into the writable part; returns the used length."""
        cdef uint32_t n = payload.shape[0]
        if <uint64_t>n + sizeof(virtio_iommu_req_tail) > self.writable_len:
            raise ValueError(f"payload of {n} bytes does not fit {self.writable_len} writable")
        if n:
            _scatter(&self.chain, 0, &payload[0], n)
        _scatter_tail(&self.chain, n, status)
        return n + sizeof(virtio_iommu_req_tail)

    def __repr__(self):
        return (f"<Request {self.type_name} domain={self.domain} endpoint={self.endpoint} "
                f"virt=[{self.virt_start:#x},{self.virt_end:#x}] phys={self.phys_start:#x} "
                f"flags={self.flags:#x}>")


cdef int _readable_size(uint8_t req_type) noexcept nogil:
    """The device-readable part of a request of this type; -1 for an unknown type."""
    cdef size_t size
    if req_type == VIRTIO_IOMMU_T_ATTACH:
        size = sizeof(virtio_iommu_req_attach)
    elif req_type == VIRTIO_IOMMU_T_DETACH:
        size = sizeof(virtio_iommu_req_detach)
    elif req_type == VIRTIO_IOMMU_T_MAP:
        size = sizeof(virtio_iommu_req_map)
    elif req_type == VIRTIO_IOMMU_T_UNMAP:
        size = sizeof(virtio_iommu_req_unmap)
    elif req_type == VIRTIO_IOMMU_T_PROBE:
        return sizeof(virtio_iommu_req_probe)  # properties and tail are device-writable
    elif req_type == VIRTIO_IOMMU_T_ATTACH_TABLE:
        size = sizeof(virtio_iommu_req_attach_table)
    elif req_type == VIRTIO_IOMMU_T_INVALIDATE:
        size = sizeof(virtio_iommu_req_invalidate)
    elif req_type == VIRTIO_IOMMU_T_PAGE_RESP:
        size = sizeof(virtio_iommu_req_page_resp)
    else:
        return -1
    return size - sizeof(virtio_iommu_req_tail)


cdef int _gather(VirtQueue vq, Chain *c) noexcept nogil:
    """Collect the chain in vq's segment arrays; its request type, or -1 when the spec says
    "cannot parse" (unknown type, readable part too small for its type, no room for the
    tail)."""
    cdef uint8_t *buf = <uint8_t *>&c.req
    cdef uint32_t chunk
    cdef unsigned int k
    cdef int need
    c.got = 0
    c.readable = 0
    c.writable = 0
    c.nwseg = 0
    for k in range(vq.nseg):
        if vq.seg_write[k]:
            if c.nwseg == MAX_WRITABLE_SEGMENTS:
                return -1
            c.wseg_ptr[c.nwseg] = vq.seg_ptr[k]
            c.wseg_len[c.nwseg] = vq.seg_len[k]
            c.nwseg += 1
            c.writable += vq.seg_len[k]
        else:
            c.readable += vq.seg_len[k]
            if c.got < sizeof(RequestBytes):
                chunk = min(vq.seg_len[k], sizeof(RequestBytes) - c.got)
                memcpy(buf + c.got, vq.seg_ptr[k], chunk)
                c.got += chunk
    if (c.got < sizeof(virtio_iommu_req_head) or c.writable < sizeof(virtio_iommu_req_tail)
            or c.writable > MAX_WRITABLE_PAYLOAD + sizeof(virtio_iommu_req_tail)):
        return -1
    need = _readable_size(c.req.head.type)
    if need < 0 or c.got < <uint32_t>need:
        return -1
    return c.req.head.type


cdef void _scatter(Chain *c, uint32_t offset, const uint8_t *src, uint32_t n) noexcept nogil:
    """Copy n bytes into the chain's writable part, from `offset` on."""
    cdef unsigned int k = 0
    cdef uint32_t chunk
    while n and k < c.nwseg:
        if offset >= c.wseg_len[k]:
            offset -= c.wseg_len[k]
            k += 1
            continue
        chunk = min(c.wseg_len[k] - offset, n)
        memcpy(c.wseg_ptr[k] + offset, src, chunk)
        src += chunk
        n -= chunk
        offset = 0
        k += 1


cdef void _scatter_tail(Chain *c, uint32_t offset, uint8_t status) noexcept nogil:
    """Write the request's tail (virtio_iommu_req_tail) at `offset` of its writable part."""
    cdef virtio_iommu_req_tail tail
    memset(&tail, 0, sizeof(tail))
    tail.status = status
    _scatter(c, offset, <const uint8_t *>&tail, sizeof(tail))


cdef Request _parse_request(VirtQueue vq, uint16_t head):
    """Decode the chain in vq's segment arrays; None when it cannot be parsed."""
    cdef Request req = Request.__new__(Request)
    cdef RequestBytes *r = &req.chain.req
    req.vq = vq
    req.head = head
    if _gather(vq, &req.chain) < 0:
        return None
    req.type = r.head.type
    req.readable_len = <uint32_t>min(req.chain.readable, <uint64_t>0xffffffff)
    req.writable_len = <uint32_t>req.chain.writable
    req.reserved_zero = True
    if req.type == VIRTIO_IOMMU_T_ATTACH:
        req.domain = r.attach.domain
        req.endpoint = r.attach.endpoint
        req.flags = r.attach.flags
        req.reserved_zero = all_zero(r.attach.reserved, sizeof(r.attach.reserved))
    elif req.type == VIRTIO_IOMMU_T_DETACH:
        req.domain = r.detach.domain
        req.endpoint = r.detach.endpoint
        req.reserved_zero = all_zero(r.detach.reserved, sizeof(r.detach.reserved))
    elif req.type == VIRTIO_IOMMU_T_MAP:
        req.domain = r.map.domain
        req.virt_start = r.map.virt_start
        req.virt_end = r.map.virt_end
        req.phys_start = r.map.phys_start
        req.flags = r.map.flags
    elif req.type == VIRTIO_IOMMU_T_UNMAP:
        req.domain = r.unmap.domain
        req.virt_start = r.unmap.virt_start
        req.virt_end = r.unmap.virt_end
        req.reserved_zero = all_zero(r.unmap.reserved, sizeof(r.unmap.reserved))
    elif req.type == VIRTIO_IOMMU_T_PROBE:
        req.endpoint = r.probe.endpoint
    elif req.type == VIRTIO_IOMMU_T_ATTACH_TABLE:
        req.domain = r.attach_table.domain
        req.endpoint = r.attach_table.endpoint
        req.format = r.attach_table.format
        req.ste0 = r.attach_table.ste[0]
        req.ste1 = r.attach_table.ste[1]
        req.reserved_zero = (
            all_zero(r.attach_table.reserved, sizeof(r.attach_table.reserved))
            and all_zero(r.attach_table.reserved2, sizeof(r.attach_table.reserved2)))
    elif req.type == VIRTIO_IOMMU_T_INVALIDATE:
        req.scope = r.invalidate.scope
        req.caches = r.invalidate.caches
        req.flags = r.invalidate.flags
        req.domain = r.invalidate.domain
        req.pasid = r.invalidate.pasid
        req.arch_id = r.invalidate.id
        req.address = r.invalidate.address
        req.nr_pages = r.invalidate.nr_pages
        req.page_size = r.invalidate.page_size
        req.reserved_zero = all_zero(r.invalidate.reserved, sizeof(r.invalidate.reserved))
    elif req.type == VIRTIO_IOMMU_T_PAGE_RESP:
        req.endpoint = r.page_resp.endpoint
        req.pasid = r.page_resp.pasid
        req.grpid = r.page_resp.grpid
        req.code = r.page_resp.code
        req.flags = r.page_resp.flags
        req.reserved_zero = all_zero(r.page_resp.reserved, sizeof(r.page_resp.reserved))
    return req


# --- what the device writes besides tails: its config space and PROBE properties ------------

cdef virtio_iommu_config _config_layout
CONFIG_BYPASS_OFFSET = <char *>&_config_layout.bypass - <char *>&_config_layout

def encode_config(uint64_t page_size_mask, tuple input_range, tuple domain_range,
                  uint32_t probe_size, bint bypass) -> bytes:
    """struct virtio_iommu_config (virtio spec 5.13.4), reserved bytes zero."""
    cdef virtio_iommu_config c
    memset(&c, 0, sizeof(c))
    c.page_size_mask = page_size_mask
    c.input_range.start, c.input_range.end = input_range
    c.domain_range.start, c.domain_range.end = domain_range
    c.probe_size = probe_size
    c.bypass = bypass
    return (<char *>&c)[:sizeof(c)]

def encode_resv_mem(uint8_t subtype, uint64_t start, uint64_t end) -> bytes:
    """A RESV_MEM PROBE property (struct virtio_iommu_probe_resv_mem), header included."""
    cdef virtio_iommu_probe_resv_mem p
    memset(&p, 0, sizeof(p))
    p.head.type = VIRTIO_IOMMU_PROBE_T_RESV_MEM
    p.head.length = sizeof(p) - sizeof(p.head)
    p.subtype = subtype
    p.start = start
    p.end = end
    return (<char *>&p)[:sizeof(p)]
