# The translation engine: DMA from endpoints translated by stage 1 as the guest configured
# it (stage1.pxi), then the host's stage 2 (stage2.pxi), through an IOTLB (iotlb.pxi), per
# stream (streams.pxi). Faults become SMMUv3 event records (event_records.pxi).
#
# Sources: Arm SMMUv3 (IHI 0070) for STE/CD/L1CD layouts, config checks and event records;
# Arm ARM VMSAv8-64 for the stage-1 walk; Linux arm-smmu-v3.h and QEMU hw/arm/smmuv3*.c,
# smmu-common.c for bit positions. Configuration errors (C_BAD_STE, C_BAD_CD,
# C_BAD_SUBSTREAMID) latch per stream until set_stream_*.
#
# Thread safety: an Engine is used by one thread at a time (callers serialise).


cdef class Engine:
    """Translates DMA from endpoints: stage 1 as the guest configured it, then the host's
    stage 2, with an IOTLB. See `translate` for results and `set_stream_*` for modes."""

    cdef GuestMemory mem
    cdef StreamTable streams
    cdef dict _tables               # sid -> MappingTable of MAP-mode streams
    cdef Stage2 s2
    cdef Iotlb tlb
    cdef readonly uint64_t iotlb_hits
    cdef readonly uint64_t iotlb_misses

    def __cinit__(self, GuestMemory mem not None, int iotlb_size=4096):
        if iotlb_size < 0 or iotlb_size & (iotlb_size - 1):
            raise ValueError(f"iotlb_size must be 0 (no IOTLB) or a power of two, "
                             f"not {iotlb_size}")
        self.mem = mem
        self._tables = {}
        if tlb_init(&self.tlb, iotlb_size) != 0:
            raise MemoryError()
        if self._build_stage2() != 0:
            raise MemoryError()

    def __dealloc__(self):
        s2_destroy(&self.s2)
        tlb_destroy(&self.tlb)
        streams_destroy(&self.streams)

    cdef int _build_stage2(self) noexcept nogil:
        """Stage 2 from the current memory table (and the overlay); cached translations go."""
        cdef int rc = s2_build(&self.s2, self.mem.regions, self.mem.nregions)
        tlb_flush_all(&self.tlb)
        return rc

    cdef inline bint _layout_current(self) noexcept nogil:
        return s2_layout_current(&self.s2, self.mem.regions, self.mem.nregions)

    cdef Stream *_configure(self, uint32_t sid, uint8_t mode) except NULL:
        """Reprogram a stream: drops its cached translations and any latched config error."""
        cdef Stream *s = streams_find(&self.streams, sid)
        if s == NULL:
            s = streams_add(&self.streams, sid)
            if s == NULL:
                raise MemoryError()
        memset(s, 0, sizeof(Stream))
        s.sid = sid
        s.mode = mode
        self._tables.pop(sid, None)
        tlb_flush_stream(&self.tlb, sid)
        return s

    cdef int _walk(self, uint32_t sid, int32_t ssid, uint64_t iova, uint32_t access,
                   Xlat *x, Fault *f) noexcept nogil:
        """Translate without the IOTLB: 0 and x, or -1 and f."""
        cdef Stream *s = streams_find(&self.streams, sid)
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
        rc = walk_stream(&self.s2, s, ssid, iova, x, f)
        if rc != 0 and f.recorded and evt_is_config_error(f.event_id):
            s.sticky = True
            s.sticky_fault = f[0]
            tlb_flush_stream(&self.tlb, sid)
        return rc

    cdef uint8_t *translate_c(self, uint32_t sid, int32_t ssid, uint64_t iova, uint32_t access,
                              uint64_t *gpa, uint64_t *avail, Fault *fault) noexcept nogil:
        """Host address of `iova` for one access (READ/WRITE/EXEC, optionally PRIV), valid
        for `avail[0]` bytes; NULL with `fault` filled otherwise (fault.recorded False: the
        transaction is terminated without an event). `gpa[0]` gets the guest-physical
        address. An IOTLB hit costs a hash, a 4-way tag compare and a shift."""
        cdef TlbEntry *e
        cdef Xlat x
        cdef uint64_t offset
        if not self._layout_current():
            self._build_stage2()  # the memory table changed: never use stale host addresses
        e = tlb_lookup(&self.tlb, sid, ssid, iova >> S2_PAGE_SHIFT, access)
        if e != NULL:
            self.iotlb_hits += 1
            offset = iova & S2_PAGE_MASK
            gpa[0] = e.ipa_page | offset
            avail[0] = S2_PAGE_SIZE - offset
            return e.host_page + offset
        self.iotlb_misses += 1
        if self._walk(sid, ssid, iova, access, &x, fault) != 0:
            return NULL
        if self.tlb.entries != NULL and x.cacheable:
            tlb_fill(&self.tlb, sid, ssid, iova, &x)
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
        if not streams_remove(&self.streams, sid):
            return False
        self._tables.pop(sid, None)
        tlb_flush_stream(&self.tlb, sid)
        return True

    def stream_sids(self) -> list:
        return [self.streams.streams[i].sid for i in range(self.streams.n)]

    # --- Python API: stage 2 ------------------------------------------------------------------

    def s2_set_perm(self, uint64_t ipa, uint64_t size, bint read, bint write) -> int:
        """Change the host's permissions on every guest-RAM page that [ipa, ipa+size)
        touches: revoke with read=write=False, write-protect with read=True, write=False.
        Returns the number of RAM pages affected."""
        cdef S2Op op
        if size == 0 or ipa + size - 1 < ipa:
            raise ValueError(f"bad stage-2 range ipa={ipa:#x} size={size:#x}")
        op.first_page = ipa >> S2_PAGE_SHIFT
        op.last_page = (ipa + size - 1) >> S2_PAGE_SHIFT
        op.perm = (S2_READ if read else 0) | (S2_WRITE if write else 0)
        if s2_keep_op(&self.s2, &op) != 0:
            raise MemoryError()
        if not self._layout_current():
            self._build_stage2()  # replays the ops kept so far, this one included
            return s2_apply_op(&self.s2, &op)
        tlb_flush_all(&self.tlb)
        return s2_apply_op(&self.s2, &op)

    def s2_reset(self) -> None:
        """Drop the overlay: every guest-RAM page readable and writable again. Stage 2 is
        also rebuilt by itself whenever the memory table changes."""
        self.s2.nops = 0
        if self._build_stage2() != 0:
            raise MemoryError()

    def s2_perm(self, uint64_t ipa):
        """(read, write) of the stage-2 page holding `ipa`, or None outside guest RAM."""
        cdef uint16_t leaf
        if not self._layout_current():
            self._build_stage2()
        leaf = s2_page(&self.s2, ipa)
        if not leaf & S2_VALID:
            return None
        return bool(leaf & S2_READ), bool(leaf & S2_WRITE)

    # --- Python API: invalidation ------------------------------------------------------------

    def invalidate_all(self) -> None:
        tlb_flush_all(&self.tlb)

    def invalidate_stream(self, uint32_t sid) -> None:
        tlb_flush_stream(&self.tlb, sid)

    def invalidate_asid(self, uint32_t asid) -> None:
        """Entries tagged with `asid`: a CD's ASID, or a MAP stream's `asid`."""
        tlb_flush_matching(&self.tlb, 0, False, asid, True, 0, <uint64_t>-1)

    def invalidate_range(self, uint32_t sid, uint64_t iova, uint64_t size) -> None:
        """The stream's entries for pages touching [iova, iova+size), every SSID."""
        cdef uint64_t last = iova + size - 1
        if size == 0:
            return
        if last < iova:
            last = <uint64_t>-1  # to the top of the address space
        tlb_flush_matching(&self.tlb, sid, True, 0, False, iova >> S2_PAGE_SHIFT,
                           last >> S2_PAGE_SHIFT)

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
