// Counts heap allocations in the process that links this target (benchmarks only).
#ifndef CMALLOC_COUNTER_H
#define CMALLOC_COUNTER_H
#include <stdint.h>
/// Number of malloc/calloc/realloc/memalign-family calls since the process started.
uint64_t xfrm_malloc_count(void);
/// Bytes malloc has handed out and not had back (mallinfo2: small-chunk heap plus mmapped chunks).
uint64_t xfrm_heap_in_use(void);
/// Returns free heap memory to the system (malloc_trim(0)).
void xfrm_heap_trim(void);
#endif
