# The lock between the request thread (requestq.pxi) and Python: a pthread mutex that
# Python takes without the GIL, and that the thread lets go of while Python waits for it.

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_cond_init(pthread_cond_t *cond, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *cond)
    int pthread_cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex)
    int pthread_cond_broadcast(pthread_cond_t *cond)


cdef class DataplaneLock:
    """The lock between the request thread and Python. Use `with lock:` (it waits without
    the GIL); the thread steps back while Python is waiting for it, so a request thread
    that is polling cannot keep the loop out."""

    cdef pthread_mutex_t mutex
    cdef pthread_cond_t cond
    cdef int python_waiting

    def __cinit__(self):
        pthread_mutex_init(&self.mutex, NULL)
        pthread_cond_init(&self.cond, NULL)

    def __dealloc__(self):
        pthread_cond_destroy(&self.cond)
        pthread_mutex_destroy(&self.mutex)

    def acquire(self) -> None:
        with nogil:
            viommu_store_flag(&self.python_waiting, 1)
            pthread_mutex_lock(&self.mutex)
            viommu_store_flag(&self.python_waiting, 0)

    def release(self) -> None:
        pthread_mutex_unlock(&self.mutex)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    cdef void lock_for_thread(self) noexcept nogil:
        while viommu_load_flag(&self.python_waiting):
            viommu_cpu_relax()
        pthread_mutex_lock(&self.mutex)
