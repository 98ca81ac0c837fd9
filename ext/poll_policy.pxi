# How long the request thread busy-polls after a request (requestq.pxi): a window that
# follows what polling earns.
#
# The rules are those of KVM's halt polling (Linux Documentation/virt/kvm/halt-polling.rst):
# the window grows when the thread slept and the next request came within the longest
# window it may poll (polling longer would have caught it), and shrinks when requests come
# further apart than that; a window that finds work is kept. (The gap after a sleep
# includes the kick's delivery and the thread's wake-up, as KVM's block time does.) One rule is added for a shared host: a poller that is preempted while
# it polls (the scheduler switched it out involuntarily, and its CPU time fell behind the
# wall clock) is taking a core that another thread wants, perhaps the very vCPU whose
# request it waits for. Then it stops polling and serves on kicks for a cool-down of
# requests, doubled each time contention is seen again, before it tries a small window
# again; the cool-down shortens again only after as many undisturbed polls as it is long.
# (Waiting for the data-plane lock while Python holds it is no preemption.)

cdef enum:
    POLL_GROW_START_NS = 10000      # the first window after none (KVM's grow_start default)
    POLL_COOLDOWN_MIN = 16          # requests served on kicks after contention is seen...
    POLL_COOLDOWN_MAX = 16384       # ...doubling up to this
    POLL_STOLEN_MIN_NS = 20000      # preemption shorter than this is scheduling noise


cdef struct PollState:
    int64_t max_ns                  # the cap (--poll-us); 0: never poll
    int64_t window_ns
    bint adaptive                   # False: always `max_ns`, as before this policy
    int64_t cooldown_left           # requests still to serve on kicks
    int64_t cooldown_len            # the next cool-down's length
    int64_t clean_polls             # undisturbed polls since the last back-off
    uint64_t hits, misses, grows, shrinks, contended


cdef void poll_init(PollState *p, int64_t max_ns, bint adaptive) noexcept nogil:
    memset(p, 0, sizeof(PollState))
    p.max_ns = max(max_ns, <int64_t>0)
    p.adaptive = adaptive
    p.window_ns = min(<int64_t>POLL_GROW_START_NS, p.max_ns) if adaptive else p.max_ns
    p.cooldown_len = POLL_COOLDOWN_MIN


cdef inline bint poll_was_preempted(int64_t wall_ns, int64_t cpu_ns,
                                    int64_t preemptions) noexcept nogil:
    """While polling for `wall_ns` the thread was switched out `preemptions` times and ran
    only `cpu_ns`: someone else had its core for more than a quarter of the time (and more
    than noise)."""
    cdef int64_t stolen = wall_ns - cpu_ns
    return preemptions > 0 and stolen > POLL_STOLEN_MIN_NS and stolen * 4 > wall_ns


cdef void poll_back_off(PollState *p) noexcept nogil:
    p.contended += 1
    p.window_ns = 0
    p.clean_polls = 0
    p.cooldown_left = p.cooldown_len
    p.cooldown_len = min(p.cooldown_len * 2, <int64_t>POLL_COOLDOWN_MAX)


cdef void poll_hit(PollState *p, int64_t wall_ns, int64_t cpu_ns,
                   int64_t preemptions) noexcept nogil:
    """Polling found a request after `wall_ns`, having run `cpu_ns` of it and been
    preempted `preemptions` times."""
    p.hits += 1
    if not p.adaptive:
        return
    if poll_was_preempted(wall_ns, cpu_ns, preemptions):
        poll_back_off(p)
        return
    p.clean_polls += 1  # polled undisturbed: contention, if any, may be easing
    if p.clean_polls >= p.cooldown_len and p.cooldown_len > POLL_COOLDOWN_MIN:
        p.cooldown_len //= 2
        p.clean_polls = 0


cdef void poll_miss(PollState *p, int64_t wall_ns, int64_t cpu_ns,
                    int64_t preemptions) noexcept nogil:
    """The window ran out without a request."""
    p.misses += 1
    if p.adaptive and poll_was_preempted(wall_ns, cpu_ns, preemptions):
        poll_back_off(p)


cdef void poll_unpolled(PollState *p, int64_t gap_ns) noexcept nogil:
    """A request came `gap_ns` after the last one's answer, with the thread not polling:
    it was asleep (woken by a kick) or giving up just then."""
    if not p.adaptive or p.max_ns == 0:
        return
    if p.cooldown_left > 0:
        p.cooldown_left -= 1
        if p.cooldown_left == 0:
            p.window_ns = min(<int64_t>POLL_GROW_START_NS, p.max_ns)
        return
    if gap_ns > p.max_ns:  # no window we may poll would have caught it
        if p.window_ns:
            p.shrinks += 1
        p.window_ns //= 2
        if p.window_ns < POLL_GROW_START_NS:
            p.window_ns = 0
    elif p.window_ns < p.max_ns:  # polling longer would have caught it
        p.grows += 1
        p.window_ns = min(p.max_ns, max(p.window_ns * 2, <int64_t>POLL_GROW_START_NS))


cdef class PollPolicy:
    """The policy alone, fed by hand (for tests): what the request thread does with it."""

    cdef PollState state

    def __cinit__(self, double max_us, bint adaptive=True):
        poll_init(&self.state, <int64_t>(max_us * 1000), adaptive)

    def hit(self, int64_t wall_ns, int64_t cpu_ns, int64_t preemptions=0) -> None:
        poll_hit(&self.state, wall_ns, cpu_ns, preemptions)

    def miss(self, int64_t wall_ns, int64_t cpu_ns, int64_t preemptions=0) -> None:
        poll_miss(&self.state, wall_ns, cpu_ns, preemptions)

    def unpolled(self, int64_t gap_ns) -> None:
        poll_unpolled(&self.state, gap_ns)

    @property
    def window_ns(self) -> int:
        return self.state.window_ns

    @property
    def cooldown_left(self) -> int:
        return self.state.cooldown_left

    def counters(self) -> dict:
        return poll_counters(&self.state)


cdef dict poll_counters(const PollState *p):
    return {"poll_window_us": p.window_ns / 1000, "poll_max_us": p.max_ns / 1000,
            "poll_adaptive": p.adaptive, "poll_hits": p.hits, "poll_misses": p.misses,
            "poll_grows": p.grows, "poll_shrinks": p.shrinks,
            "poll_backoffs": p.contended, "poll_cooldown_left": p.cooldown_left}
