# The requestq on a thread of its own: kicks, MAP/UNMAP and the used ring without the GIL.
#
# The guest driver spins on the used ring after every request, so request latency is what
# a guest feels. `RequestServer` waits for kicks with epoll, serves MAP and UNMAP that
# succeed entirely here (S_OK from the device's MapRules against the domain's table), then
# polls the avail ring for a short window with kicks suppressed (VRING_USED_F_NO_NOTIFY),
# so a guest issuing requests back to back never exits to notify. Everything else is
# handed to Python, which answers every other status (through the same MapRules for MAP
# and UNMAP): the chain is left pending in the VirtQueue and the backend's loop serves it
# (and the rest of the ring) with `VirtQueue.process_requests`.
#
# The busy-poll window adapts to what polling earns (poll_policy.pxi). In the benchmark
# mode `null_device` the thread answers every request S_OK and does nothing else: the floor
# that the transport itself costs.
#
# Sharing: the thread touches the VirtQueue, guest memory and the MAP tables only while it
# holds the `DataplaneLock`; the backend's loop holds that lock whenever it is not waiting
# in select (viommu.dataplane.loop), so Python code on the loop may change any of them.

cdef enum:
    DEFAULT_TRACE_CAPACITY = 16384


cdef struct FastDomain:
    uint32_t domain_id
    MapData *map

# One MAP or UNMAP served here, for the device's request trace.
cdef struct ServedRecord:
    double time
    uint64_t virt_start
    uint64_t virt_end
    uint64_t phys_start
    uint32_t domain
    uint32_t flags
    uint8_t type


cdef class RequestServer:
    """Serves one requestq on its own thread (see the top of requestq.pxi).

    Python drives it from the loop, holding the lock: `configure` and `set_domains` say
    which MAP/UNMAP may succeed here, `wake_fd` becomes readable when the thread needs
    Python (`take_wake`: a chain handed off, the driver wants an interrupt, the trace wants
    draining), `resume` lets the thread go on after a hand-off, `drain` returns what it
    served. `poll_us` caps the busy-poll window after the last request (0: kicks only);
    `adaptive` lets the window follow what polling earns (poll_policy.pxi), else it is
    always `poll_us`. `null_device`: every request is answered S_OK and nothing is done
    (a benchmark's floor; nothing reaches Python).
    """

    cdef DataplaneLock lock
    cdef VirtQueue vq
    cdef int kick_fd, stop_fd, epoll_fd
    cdef readonly int wake_fd
    cdef PollState poll
    cdef readonly bint null_device
    # what may succeed here: the device's rules
    cdef bint map_unmap
    cdef MapLimits rules
    cdef FastDomain *domains        # sorted by domain_id
    cdef size_t ndomains
    cdef list _domain_owners        # the MappingTables owning the MapData above
    # shared with Python under the lock
    cdef bint handoff, notify_needed, drain_wanted, stopping, paused
    cdef bint wake_sent             # wake_fd signalled, Python has not taken it yet
    cdef ServedRecord *served
    cdef size_t served_cap, served_len
    cdef uint64_t dropped_map, dropped_unmap   # served but not recorded (buffer full)
    # counters
    cdef readonly uint64_t fast_requests, handoffs, sleeps, kicks_seen
    cdef object _thread

    def __cinit__(self, DataplaneLock lock not None, VirtQueue vq not None, int kick_fd,
                  double poll_us=200.0, size_t trace_capacity=DEFAULT_TRACE_CAPACITY,
                  bint adaptive=True, bint null_device=False):
        cdef epoll_event ev
        cdef int fd  # typed: see VirtioBlkQueue.set_features
        self.lock = lock
        self.vq = vq
        poll_init(&self.poll, <int64_t>(poll_us * 1000), adaptive)
        self.null_device = null_device
        self.kick_fd = self.stop_fd = self.wake_fd = self.epoll_fd = -1
        self._domain_owners = []
        self.served_cap = max(trace_capacity, <size_t>1)
        self.served = <ServedRecord *>malloc(self.served_cap * sizeof(ServedRecord))
        if self.served == NULL:
            raise MemoryError()
        self.kick_fd = dup(kick_fd)
        self.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.epoll_fd = epoll_create1(EPOLL_CLOEXEC)
        if min(self.kick_fd, self.stop_fd, self.wake_fd, self.epoll_fd) < 0:
            self._close_fds()
            raise OSError("request thread: cannot create its eventfds and epoll")
        for fd in (self.kick_fd, self.stop_fd):
            ev.events = EPOLLIN
            ev.data.fd = fd
            epoll_ctl(self.epoll_fd, EPOLL_CTL_ADD, fd, &ev)

    def __dealloc__(self):
        self._close_fds()
        free(self.served)
        free(self.domains)

    cdef void _close_fds(self) noexcept:
        cdef int fd
        for fd in (self.kick_fd, self.stop_fd, self.wake_fd, self.epoll_fd):
            if fd >= 0:
                close(fd)
        self.kick_fd = self.stop_fd = self.wake_fd = self.epoll_fd = -1

    # --- Python side (holding the lock) -------------------------------------------------

    def configure(self, bint map_unmap, MapRules rules not None) -> None:
        """Whether VIRTIO_IOMMU_F_MAP_UNMAP is negotiated, and the device's MapRules."""
        self.map_unmap = map_unmap
        self.rules = rules.limits

    def set_domains(self, domains) -> None:
        """The MAP domains, as (domain ID, MappingTable); bypass and page-table domains are
        left out (Python refuses MAP/UNMAP to them)."""
        cdef list items = sorted(domains, key=lambda item: item[0])
        cdef FastDomain *table = <FastDomain *>malloc(max(len(items), 1) * sizeof(FastDomain))
        cdef MappingTable mappings
        if table == NULL:
            raise MemoryError()
        for i, (domain_id, mappings) in enumerate(items):
            table[i].domain_id = domain_id
            table[i].map = mappings.data
        free(self.domains)
        self.domains = table
        self.ndomains = len(items)
        self._domain_owners = [mappings for _, mappings in items]

    def start(self) -> None:
        import threading
        self._thread = threading.Thread(target=self._thread_main, daemon=True,
                                        name=f"viommu-requestq{self.vq.index}")
        self._thread.start()

    def _thread_main(self) -> None:
        with nogil:
            self._run()

    def stop(self) -> None:
        """End the thread. The caller holds the lock; it is let go while the thread ends.
        Kicks are re-enabled so whoever serves the ring next hears them."""
        self.stopping = True
        self.vq._suppress_kicks(False)
        pthread_cond_broadcast(&self.lock.cond)
        eventfd_signal(self.stop_fd)
        if self._thread is not None and self._thread.is_alive():
            self.lock.release()
            try:
                self._thread.join()
            finally:
                self.lock.acquire()
        self._thread = None

    def close(self) -> None:
        self._close_fds()

    def take_wake(self) -> tuple:
        """Why the thread woke Python: (a chain is handed off, the driver wants an
        interrupt). Clears the wake eventfd and the interrupt request."""
        eventfd_clear(self.wake_fd)
        self.wake_sent = False
        notify = self.notify_needed
        self.notify_needed = False
        self.drain_wanted = False
        return self.handoff, notify

    def resume(self) -> None:
        """Python served the handed-off chain: the thread goes on."""
        self.handoff = False
        pthread_cond_broadcast(&self.lock.cond)

    def pause(self, bint paused=True) -> None:
        """Stop serving (a broken ring) until `pause(False)`."""
        self.paused = paused

    @property
    def handing_off(self) -> bool:
        return self.handoff

    def poll_counters(self) -> dict:
        """The busy-poll window now and what the policy saw (poll_policy.pxi)."""
        return poll_counters(&self.poll)

    def drain(self) -> tuple:
        """The MAP/UNMAP served here since the last drain, oldest first, as tuples
        (time, type, domain, virt_start, virt_end, phys_start, flags); then how many more
        MAP and UNMAP were served but not recorded because the record buffer was full."""
        cdef size_t i
        cdef ServedRecord *r
        records = []
        for i in range(self.served_len):
            r = &self.served[i]
            records.append((r.time, r.type, r.domain, r.virt_start, r.virt_end,
                            r.phys_start, r.flags))
        self.served_len = 0
        dropped = (self.dropped_map, self.dropped_unmap)
        self.dropped_map = self.dropped_unmap = 0
        return records, *dropped

    # --- the thread --------------------------------------------------------------------

    cdef void _run(self) noexcept nogil:
        cdef int64_t last_work = monotonic_ns(), now, poll_cpu = 0, poll_switches = 0
        cdef int64_t cpu, switches
        cdef bint polling = False
        cdef bint pending
        cdef int served
        self.lock.lock_for_thread()
        self.vq._suppress_kicks(False)  # a previous server may have left them off
        pthread_mutex_unlock(&self.lock.mutex)
        while True:
            self.lock.lock_for_thread()
            if self.stopping:
                pthread_mutex_unlock(&self.lock.mutex)
                return
            served = self._serve_available()
            if (self.handoff or self.notify_needed or self.drain_wanted) and not self.wake_sent:
                self.wake_sent = True
                eventfd_signal(self.wake_fd)
            while self.handoff and not self.stopping:
                pthread_cond_wait(&self.lock.cond, &self.lock.mutex)
            now = monotonic_ns()
            if served:
                # What polling earned: a request found while polling, or one that came
                # while the thread slept or was giving up.
                if polling:
                    cpu, switches = thread_cpu_ns(), thread_preemptions()
                    poll_hit(&self.poll, now - last_work, cpu - poll_cpu,
                             switches - poll_switches)
                    # The next polling run starts here, kicks still suppressed: no second
                    # read of the clocks, no second barrier.
                    poll_cpu, poll_switches = cpu, switches
                else:
                    poll_unpolled(&self.poll, now - last_work)
                last_work = now
            if self.poll.window_ns > 0 and now - last_work < self.poll.window_ns:
                if not polling:
                    self.vq._suppress_kicks(True)
                    polling = True
                    poll_cpu = thread_cpu_ns()
                    poll_switches = thread_preemptions()
                pthread_mutex_unlock(&self.lock.mutex)
                viommu_cpu_relax()
                continue
            if polling:
                if not served:  # a run that ended in a hit was counted above
                    poll_miss(&self.poll, now - last_work, thread_cpu_ns() - poll_cpu,
                              thread_preemptions() - poll_switches)
                polling = False
            # Going to sleep: kicks back on, then look once more, or a request made
            # available just before the flag cleared would wait for the next kick.
            self.vq._suppress_kicks(False)
            pending = self.vq._avail_pending() != 0 and not self.paused
            pthread_mutex_unlock(&self.lock.mutex)
            if not pending:
                self._wait_for_kick()

    cdef void _wait_for_kick(self) noexcept nogil:
        cdef epoll_event ev
        self.sleeps += 1
        if epoll_wait(self.epoll_fd, &ev, 1, -1) == 1 and ev.data.fd == self.kick_fd:
            eventfd_clear(self.kick_fd)
            self.kicks_seen += 1

    cdef int _serve_available(self) noexcept nogil:
        """Serve chains until the ring is empty or one needs Python; the number served."""
        cdef uint16_t head
        cdef int rc, req_type, served = 0
        cdef Chain chain
        if self.paused or self.handoff:
            return 0
        while True:
            rc = self.vq._pop_chain(&head)
            if rc == 0:
                break
            if rc == -2:  # a broken ring: Python raises RingError and marks the device
                self.handoff = True
                self.handoffs += 1
                break
            served += 1
            if rc < 0:
                self.vq._add_used(head, 0)
                continue
            req_type = _gather(self.vq, &chain)
            if req_type < 0:
                self.vq._add_used(head, 0)  # the spec's answer to an unparsable request
                continue
            if self.null_device:  # S_OK in the tail, after any PROBE properties (none)
                _scatter_tail(&chain, <uint32_t>(chain.writable - sizeof(virtio_iommu_req_tail)),
                              VIRTIO_IOMMU_S_OK)
                self.vq._add_used(head, <uint32_t>chain.writable)
                self.fast_requests += 1
                continue
            if not self._serve_here(req_type, &chain):
                self.vq._keep_pending(head)
                self.handoff = True
                self.handoffs += 1
                served -= 1
                break
            _scatter_tail(&chain, 0, VIRTIO_IOMMU_S_OK)
            self.vq._add_used(head, sizeof(virtio_iommu_req_tail))
            self.fast_requests += 1
        if served:
            self.vq._publish_used()  # one index update for the batch
            if self.vq._needs_interrupt():
                self.notify_needed = True
        return served

    cdef bint _serve_here(self, int req_type, Chain *c) noexcept nogil:
        """Apply a MAP or UNMAP whose status is S_OK; False (nothing changed) for anything
        else, which Python answers."""
        cdef const virtio_iommu_req_map *m = &c.req.map
        cdef const virtio_iommu_req_unmap *u = &c.req.unmap
        cdef ServedRecord req             # the fields, read once: applied, then recorded
        cdef MapData *d
        cdef uint8_t status
        if not self.map_unmap or (req_type != VIRTIO_IOMMU_T_MAP
                                  and req_type != VIRTIO_IOMMU_T_UNMAP):
            return False
        req.type = <uint8_t>req_type
        if req_type == VIRTIO_IOMMU_T_MAP:
            req.domain, req.virt_start, req.virt_end = m.domain, m.virt_start, m.virt_end
            req.phys_start, req.flags = m.phys_start, m.flags
        else:
            req.domain, req.virt_start, req.virt_end = u.domain, u.virt_start, u.virt_end
            req.phys_start = req.flags = 0
        d = self._domain(req.domain)
        if d == NULL:
            return False
        if req_type == VIRTIO_IOMMU_T_MAP:
            status = map_apply(&self.rules, d, self._mapping_count(), req.virt_start,
                               req.virt_end, req.phys_start, req.flags)
        elif not all_zero(u.reserved, sizeof(u.reserved)):
            return False  # S_INVAL
        else:
            status = unmap_apply(d, req.virt_start, req.virt_end)
        if status != VIRTIO_IOMMU_S_OK:
            return False
        self._record(&req)
        return True

    cdef MapData *_domain(self, uint32_t domain_id) noexcept nogil:
        cdef size_t lo = 0, hi = self.ndomains, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.domains[mid].domain_id < domain_id:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.ndomains and self.domains[lo].domain_id == domain_id:
            return self.domains[lo].map
        return NULL

    cdef size_t _mapping_count(self) noexcept nogil:
        cdef size_t i, total = 0
        for i in range(self.ndomains):
            total += self.domains[i].map.n
        return total

    cdef void _record(self, ServedRecord *req) noexcept nogil:
        if self.served_len == self.served_cap:
            if req.type == VIRTIO_IOMMU_T_MAP:
                self.dropped_map += 1
            else:
                self.dropped_unmap += 1
            return
        req.time = wall_time()
        self.served[self.served_len] = req[0]
        self.served_len += 1
        if self.served_len * 4 >= self.served_cap * 3:
            self.drain_wanted = True
