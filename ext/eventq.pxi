# The eventq on a thread of its own: fault records into the buffers the driver posted,
# and the driver notified, without the GIL and without waiting for the backend's loop.
#
# Python decides which records exist (viommu.events.relay: conversion from SMMUv3 events,
# the FIFO's bound, losses, the summary after an overflow, PASID drains); `EventServer`
# holds them in order and writes each into the next buffer the driver posted (virtio spec
# 5.13.6.9 "Fault reporting"), then signals the call eventfd when the driver wants
# interrupts. It reports what it did, oldest first (`take_report`): a record delivered, or
# the armed summary record queued behind the others. The relay replays that report on its
# copy of the queue, so its counters and trace states match what the guest got.
#
# When records wait, the ring is looked at: at once when Python posts one (`serve`, on the
# caller's thread, which holds the lock), on every kick, and at backed-off intervals while
# the driver has no buffer posted. Linux posts its first eventq buffers without a kick
# (viommu_fill_evtq, drivers/iommu/virtio-iommu.c) and kicks after re-posting them in
# viommu_event_handler.
#
# Sharing: like the request thread (requestq.pxi), the thread touches the ring and guest
# memory only while it holds the `DataplaneLock`, which the backend's loop holds outside its
# waits; Python calls every method below holding it.

cdef enum:
    # report kinds (viommu.dataplane.records.RecordQueue reports the same)
    EVENT_DELIVERED_KIND = 0
    EVENT_SUMMARY_QUEUED_KIND = 1
    # while records wait for a buffer, the ring is looked at after 1 ms, then ever less often
    EVENT_LOOK_FIRST_MS = 1
    EVENT_LOOK_MAX_MS = 64

EVENT_DELIVERED = EVENT_DELIVERED_KIND
EVENT_SUMMARY_QUEUED = EVENT_SUMMARY_QUEUED_KIND


# Room for either fault record the eventq carries.
cdef union FaultBytes:
    virtio_iommu_fault fault
    virtio_iommu_fault_ext ext

cdef struct HeldRecord:
    FaultBytes data
    uint32_t len

cdef struct EventReport:
    int64_t time_ns             # CLOCK_MONOTONIC with the used index published, as the
    uint8_t kind                # call eventfd is written (records.py says why before)


cdef class EventServer:
    """Holds the eventq's records and serves its ring on a thread (top of eventq.pxi).

    Python, holding the lock: `post` and `arm_summary` queue records, `remove` and `clear`
    take them back, `serve` delivers what the posted buffers allow at once, `take_report`
    says what was delivered since. `start` runs the thread on a started ring, `stop` ends
    it (the records stay). `wake_fd` becomes readable when the thread needs Python
    (`take_wake`: the report is filling up, or the driver broke the ring)."""

    cdef DataplaneLock lock
    cdef VirtQueue vq
    cdef int kick_fd, call_fd, due_fd, stop_fd, epoll_fd
    cdef readonly int wake_fd
    # the records the driver has not taken, oldest at `first` (a circular buffer)
    cdef HeldRecord *records
    cdef size_t capacity, first, count
    cdef HeldRecord summary
    cdef bint summary_armed
    cdef EventReport *report
    cdef size_t report_cap, report_len
    cdef bint running, stopping, paused, ring_failed, wake_sent
    cdef int look_max_ms
    cdef readonly uint64_t delivered, notifies, kicks_seen, looks, wakes
    cdef object _thread

    def __cinit__(self, DataplaneLock lock not None, size_t capacity,
                  int look_max_ms=EVENT_LOOK_MAX_MS):
        """`look_max_ms`: the longest wait between two looks at a ring without buffers
        while records wait."""
        cdef epoll_event ev
        cdef int fd  # typed: see VirtioBlkQueue.set_features
        self.lock = lock
        self.look_max_ms = max(look_max_ms, <int>EVENT_LOOK_FIRST_MS)
        self.capacity = max(capacity, <size_t>1)
        # Between two reports each record held (at most `capacity`) is delivered once, and
        # the summary is queued and delivered once: room for all of it, and to spare.
        self.report_cap = 2 * self.capacity + 8
        self.records = <HeldRecord *>malloc(self.capacity * sizeof(HeldRecord))
        self.report = <EventReport *>malloc(self.report_cap * sizeof(EventReport))
        if self.records == NULL or self.report == NULL:
            raise MemoryError()
        self.kick_fd = self.call_fd = -1
        self.due_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.epoll_fd = epoll_create1(EPOLL_CLOEXEC)
        if min(self.due_fd, self.stop_fd, self.wake_fd, self.epoll_fd) < 0:
            self._close_fds()
            raise OSError("event thread: cannot create its eventfds and epoll")
        for fd in (self.due_fd, self.stop_fd):
            ev.events = EPOLLIN
            ev.data.fd = fd
            epoll_ctl(self.epoll_fd, EPOLL_CTL_ADD, fd, &ev)

    def __dealloc__(self):
        self._close_fds()
        free(self.records)
        free(self.report)

    def close(self) -> None:
        """Give back every fd (after `stop`)."""
        self._close_fds()

    cdef void _close_fds(self) noexcept:
        cdef int fd
        for fd in (self.kick_fd, self.call_fd, self.due_fd, self.stop_fd, self.wake_fd,
                   self.epoll_fd):
            if fd >= 0:
                close(fd)
        self.kick_fd = self.call_fd = self.due_fd = self.stop_fd = self.wake_fd = -1
        self.epoll_fd = -1

    # --- the records (Python, holding the lock) -------------------------------------------

    @property
    def held(self) -> int:
        return self.count

    def post(self, const uint8_t[::1] record not None) -> None:
        """Queue one encoded fault record behind the others."""
        if self.count == self.capacity:
            raise OverflowError(f"the eventq holds {self.capacity} records already")
        self._copy_in(&self.records[(self.first + self.count) % self.capacity], record)
        self.count += 1

    def arm_summary(self, const uint8_t[::1] record not None) -> None:
        """After the next delivery, queue this record behind the others (once)."""
        self._copy_in(&self.summary, record)
        self.summary_armed = True

    cdef void _copy_in(self, HeldRecord *slot, const uint8_t[::1] record) except *:
        if record.shape[0] == 0 or <size_t>record.shape[0] > sizeof(FaultBytes):
            raise ValueError(f"a fault record is 1..{sizeof(FaultBytes)} bytes, "
                             f"got {record.shape[0]}")
        memcpy(&slot.data, &record[0], record.shape[0])
        slot.len = record.shape[0]

    def remove(self, positions) -> None:
        """Take back the records at these positions (0: the oldest), ascending."""
        cdef size_t kept = 0, i, j = 0
        cdef list drop = sorted(set(positions))
        for i in range(self.count):
            if j < len(drop) and drop[j] == i:
                j += 1
                continue
            if kept != i:
                self.records[(self.first + kept) % self.capacity] = \
                    self.records[(self.first + i) % self.capacity]
            kept += 1
        self.count = kept

    def clear(self) -> None:
        """Drop every record held and the armed summary (the guest they were for is gone)."""
        self.first = self.count = 0
        self.summary_armed = False

    def take_report(self) -> list:
        """What happened since the last call, oldest first: (EVENT_DELIVERED, time_ns)
        when the oldest record went into a buffer, (EVENT_SUMMARY_QUEUED, time_ns) when
        the armed summary went in behind the others."""
        cdef size_t i
        out = [(self.report[i].kind, self.report[i].time_ns) for i in range(self.report_len)]
        self.report_len = 0
        return out

    def serve(self) -> bool:
        """Deliver what the posted buffers allow, now; False when the driver broke the
        ring (the caller reports it). The thread goes on looking while records wait."""
        with nogil:
            self._serve()
        if self.count and self.running:
            eventfd_signal(self.due_fd)
        return not self.ring_failed

    # --- the ring and the thread (Python, holding the lock) --------------------------------

    def start(self, VirtQueue vq not None, int kick_fd, int call_fd) -> None:
        """Serve this started ring on a new thread, hearing kicks on `kick_fd` and
        notifying the driver on `call_fd` (-1: none yet)."""
        cdef epoll_event ev
        import threading
        if self.running:
            self.stop()
        self.vq = vq
        self.ring_failed = self.stopping = False
        self.kick_fd = dup(kick_fd)
        if self.kick_fd < 0:
            raise OSError("event thread: cannot dup the kick fd")
        ev.events = EPOLLIN
        ev.data.fd = self.kick_fd
        epoll_ctl(self.epoll_fd, EPOLL_CTL_ADD, self.kick_fd, &ev)
        self.set_call_fd(call_fd)
        self.running = True
        self._thread = threading.Thread(target=self._thread_main, daemon=True,
                                        name=f"viommu-eventq{vq.index}")
        self._thread.start()

    def set_call_fd(self, int call_fd) -> None:
        """The front-end gave the ring another call fd (-1: none)."""
        if self.call_fd >= 0:
            close(self.call_fd)
        self.call_fd = dup(call_fd) if call_fd >= 0 else -1

    def stop(self) -> None:
        """End the thread; the records stay. The caller holds the lock; it is let go
        while the thread ends."""
        if not self.running:
            return
        self.stopping = True
        eventfd_signal(self.stop_fd)
        if self._thread is not None and self._thread.is_alive():
            self.lock.release()
            try:
                self._thread.join()
            finally:
                self.lock.acquire()
        self._thread = None
        self.running = False
        eventfd_clear(self.stop_fd)
        epoll_ctl(self.epoll_fd, EPOLL_CTL_DEL, self.kick_fd, NULL)
        close(self.kick_fd)
        self.kick_fd = -1
        self.set_call_fd(-1)
        self.vq = None

    def pause(self, bint paused=True) -> None:
        """Stop delivering (the device is broken) until `pause(False)`."""
        self.paused = paused
        if not paused and self.running:
            eventfd_signal(self.due_fd)

    def take_wake(self) -> bool:
        """Clear the wake-up; True when the driver broke the ring."""
        eventfd_clear(self.wake_fd)
        self.wake_sent = False
        return self.ring_failed

    def _thread_main(self) -> None:
        with nogil:
            self._run()

    # --- the thread ------------------------------------------------------------------------

    cdef void _run(self) noexcept nogil:
        cdef int look_ms = EVENT_LOOK_FIRST_MS
        cdef bint waiting
        cdef int delivered
        while True:
            self.lock.lock_for_thread()
            if self.stopping:
                pthread_mutex_unlock(&self.lock.mutex)
                return
            delivered = self._serve()
            if (self.ring_failed or self.report_len * 4 >= self.report_cap * 3) \
                    and not self.wake_sent:
                self.wake_sent = True
                self.wakes += 1
                eventfd_signal(self.wake_fd)
            waiting = (self.count != 0 and not self.paused and not self.ring_failed
                       and self.report_len + 2 <= self.report_cap)
            pthread_mutex_unlock(&self.lock.mutex)
            if not waiting:
                look_ms = EVENT_LOOK_FIRST_MS
                self._wait(-1)
                continue
            if delivered:
                look_ms = EVENT_LOOK_FIRST_MS
            self._wait(look_ms)
            look_ms = min(look_ms * 2, self.look_max_ms)

    cdef void _wait(self, int timeout_ms) noexcept nogil:
        cdef epoll_event evs[3]
        cdef int i, n = epoll_wait(self.epoll_fd, evs, 3, timeout_ms)
        for i in range(n):
            if evs[i].data.fd == self.kick_fd:
                eventfd_clear(self.kick_fd)
                self.kicks_seen += 1
            elif evs[i].data.fd == self.due_fd:
                eventfd_clear(self.due_fd)

    cdef int _serve(self) noexcept nogil:
        """Write held records into posted buffers, oldest first, until either runs out;
        one notify for the batch. The number delivered."""
        cdef HeldRecord *rec
        cdef int rc, delivered = 0
        cdef size_t i, batch = self.report_len
        cdef int64_t now
        if (self.vq is None or not self.running or self.paused or self.ring_failed
                or not self.vq.started or self.count == 0):
            return 0
        self.looks += 1
        while self.count and self.report_len + 2 <= self.report_cap:
            rec = &self.records[self.first]
            rc = self.vq._push_record(<const uint8_t *>&rec.data, rec.len)
            if rc == -2:
                self.ring_failed = True
                break
            if rc == 0:
                break
            self.first = (self.first + 1) % self.capacity
            self.count -= 1
            delivered += 1
            self._report(EVENT_DELIVERED_KIND)
            if self.summary_armed:  # a slot was just freed: there is room for it
                self.records[(self.first + self.count) % self.capacity] = self.summary
                self.count += 1
                self.summary_armed = False
                self._report(EVENT_SUMMARY_QUEUED_KIND)
        if delivered:
            self.delivered += delivered
            now = monotonic_ns()
            if self.call_fd >= 0 and self.vq._needs_interrupt():
                eventfd_signal(self.call_fd)
                self.notifies += 1
            for i in range(batch, self.report_len):
                self.report[i].time_ns = now
        return delivered

    cdef inline void _report(self, uint8_t kind) noexcept nogil:
        self.report[self.report_len].kind = kind
        self.report[self.report_len].time_ns = 0
        self.report_len += 1
