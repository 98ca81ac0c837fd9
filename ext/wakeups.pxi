# What the queue threads (requestq.pxi, eventq.pxi) wait and keep time with: eventfds,
# epoll and the clocks.

from libc.stdint cimport int64_t
from posix.time cimport clock_gettime, CLOCK_MONOTONIC, CLOCK_REALTIME, timespec
from posix.unistd cimport close, dup, read, write


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t "epoll_data":
        int fd
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<time.h>" nogil:
    enum:
        CLOCK_THREAD_CPUTIME_ID

cdef extern from "<sys/resource.h>" nogil:
    struct rusage:
        long ru_nivcsw
    enum:
        RUSAGE_THREAD
    int getrusage(int who, rusage *usage)


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec

cdef inline int64_t thread_cpu_ns() noexcept nogil:
    """CPU time the calling thread has had (it runs less than the wall clock says when
    other threads take its core)."""
    cdef timespec ts
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec

cdef inline int64_t thread_preemptions() noexcept nogil:
    """How often the scheduler took the calling thread's core away while it could run
    (involuntary context switches; waiting for a lock or an fd is voluntary)."""
    cdef rusage usage
    if getrusage(RUSAGE_THREAD, &usage) != 0:
        return 0
    return usage.ru_nivcsw

cdef inline double wall_time() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9

cdef void eventfd_signal(int fd) noexcept nogil:
    cdef uint64_t one = 1
    write(fd, &one, 8)  # EAGAIN only when the counter is saturated: already signalled

cdef void eventfd_clear(int fd) noexcept nogil:
    cdef uint64_t value
    read(fd, &value, 8)
