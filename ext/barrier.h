/* Memory ordering for rings shared with a guest: a full fence orders the
 * guest-visible stores (used element, then used->idx) and the loads
 * (avail->idx, then descriptors), on any host architecture. */
#ifndef VIOMMU_BARRIER_H
#define VIOMMU_BARRIER_H
#include <stdint.h>
static inline void viommu_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline uint16_t viommu_load16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
static inline void viommu_store16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
#endif
