/* Memory ordering for rings shared with a guest: a full fence orders the
 * guest-visible stores (used element, then used->idx) and the loads
 * (avail->idx, then descriptors), on any host architecture. */
#ifndef VIOMMU_BARRIER_H
#define VIOMMU_BARRIER_H
#include <stdint.h>
static inline void viommu_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline uint16_t viommu_load16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
static inline void viommu_store16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
/* A flag one thread sets and another polls without holding a lock. */
static inline int viommu_load_flag(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void viommu_store_flag(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/* Busy-wait hint: lets the sibling hyperthread (or the host, under a hypervisor) run. */
static inline void viommu_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
#endif
}
#endif
