// Counts heap allocations in the process that links this target (benchmarks only).
#ifndef CMALLOC_COUNTER_H
#define CMALLOC_COUNTER_H
#include <stdint.h>
/// Number of malloc/calloc/realloc/memalign-family calls since the process started.
uint64_t xfrm_malloc_count(void);
#endif
