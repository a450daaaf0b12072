// Counts heap allocations of the process it is linked into, by interposing malloc and friends (glibc's own
// implementations stay reachable as __libc_*). For benchmarks only: never linked into the library.
#ifndef CMALLOC_COUNTER_H
#define CMALLOC_COUNTER_H
#include <stdint.h>
/// Allocations (malloc, calloc, realloc, posix_memalign, aligned_alloc) since the process started, all threads.
uint64_t cmc_allocations(void);
#endif
