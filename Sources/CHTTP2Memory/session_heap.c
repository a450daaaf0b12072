// See include/CHTTP2Memory.h for what this is for.
#include "CHTTP2Memory.h"

#include <malloc.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

// A session holds very few large blocks (the frame buffer, the stream table; a large inbound frame's buffer for a
// while): a short array searched linearly, and only for a pointer that starts a page. Four slots, 16 bytes each: the
// heap is part of every idle connection (a fifth large block comes from malloc).
enum { H2_HEAP_SLOTS = 4 };

// Small blocks up to H2_SMALL_MAX are kept for reuse when freed, in a cache shared by the sessions of one loop:
// nghttp2 allocates and frees the same few sizes for every stream (the stream, its outbound items, the copied
// header list), and with many streams in flight glibc's per-thread cache (7 blocks a size) overflows into its slower
// paths. Shared, not per session: a block one connection frees is the next one's, so connections that each make a
// call and idle leave no kept blocks behind them. A block's class is its glibc chunk size in 16-byte units, read
// back at free with malloc_usable_size: no header of our own on any block (it would cost an idle connection about a
// kilobyte over nghttp2's long-lived blocks).
enum { H2_SMALL_MAX = 512, H2_CLASSES = (H2_SMALL_MAX + 8 + 15) / 16 + 1, H2_KEEP_PER_CLASS = 256 };

typedef struct {
    void *base;
    uint32_t length;  // bytes mapped: the request rounded up to pages (larger blocks come from malloc)
    uint32_t discardable;
} h2_large_block;

typedef struct h2_free_block {
    struct h2_free_block *next;
} h2_free_block;

struct h2_block_cache {
    h2_free_block *free_blocks[H2_CLASSES];
    uint16_t free_count[H2_CLASSES];
};

struct h2_heap {
    h2_large_block blocks[H2_HEAP_SLOTS];
    int count;
    int creating;
    h2_block_cache *cache;  // NULL: small blocks go straight to malloc and free
};

// Atomic: the loops of a group make their first sessions at the same moment (same value, but a race all the same).
static size_t page_size(void) {
    static _Atomic size_t size;
    size_t known = atomic_load_explicit(&size, memory_order_relaxed);
    if (known == 0) {
        known = (size_t)sysconf(_SC_PAGESIZE);
        atomic_store_explicit(&size, known, memory_order_relaxed);
    }
    return known;
}

// Large blocks start on a page; other blocks rarely do, so most frees skip the search.
static int find(const h2_heap *heap, const void *ptr) {
    if (heap->count == 0 || ((uintptr_t)ptr & (page_size() - 1)) != 0) return -1;
    for (int i = 0; i < heap->count; i++) {
        if (heap->blocks[i].base == ptr) return i;
    }
    return -1;
}

// A block of its own pages, or NULL (then the caller falls back to malloc) when the slots are full, the block is
// within a page of 4 GiB, or mmap fails.
// `frame_buffer`: a block whose bytes may be thrown away while the connection is idle.
static void *large_alloc(h2_heap *heap, size_t size, int frame_buffer) {
    if (heap->count == H2_HEAP_SLOTS || size > UINT32_MAX - page_size()) return NULL;
    size_t length = (size + page_size() - 1) & ~(page_size() - 1);
    void *base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return NULL;
    heap->blocks[heap->count++] = (h2_large_block){base, (uint32_t)length, (uint32_t)frame_buffer};
    return base;
}

static void large_free(h2_heap *heap, int index) {
    munmap(heap->blocks[index].base, heap->blocks[index].length);
    heap->blocks[index] = heap->blocks[--heap->count];
}

// glibc's chunk for `size` bytes: size plus its 8-byte header, in 16-byte steps, at least 32 bytes. A block
// allocated as `class * 16 - 8` bytes has exactly that chunk, so malloc_usable_size gives its class back.
static size_t size_class(size_t size) {
    size_t cls = (size + 8 + 15) / 16;
    return cls < 2 ? 2 : cls;
}

static void *small_alloc(h2_heap *heap, size_t size) {
    h2_block_cache *cache = heap->cache;
    if (!cache || size > H2_SMALL_MAX) return malloc(size);
    size_t cls = size_class(size);
    h2_free_block *block = cache->free_blocks[cls];
    if (block) {
        cache->free_blocks[cls] = block->next;
        cache->free_count[cls]--;
        return block;
    }
    return malloc(cls * 16 - 8);
}

static void small_free(h2_heap *heap, void *ptr) {
    h2_block_cache *cache = heap->cache;
    if (cache) {
        size_t cls = (malloc_usable_size(ptr) + 8) / 16;
        if (cls < H2_CLASSES && cache->free_count[cls] < H2_KEEP_PER_CLASS) {
            h2_free_block *block = ptr;
            block->next = cache->free_blocks[cls];
            cache->free_blocks[cls] = block;
            cache->free_count[cls]++;
            return;
        }
    }
    free(ptr);
}

h2_block_cache *h2_block_cache_new(void) { return calloc(1, sizeof(h2_block_cache)); }

void h2_block_cache_free(h2_block_cache *cache) {
    for (int cls = 0; cls < H2_CLASSES; cls++) {
        while (cache->free_blocks[cls]) {
            h2_free_block *block = cache->free_blocks[cls];
            cache->free_blocks[cls] = block->next;
            free(block);
        }
    }
    free(cache);
}

size_t h2_block_cache_kept(const h2_block_cache *cache) {
    size_t kept = 0;
    for (int cls = 0; cls < H2_CLASSES; cls++) kept += cache->free_count[cls];
    return kept;
}

static void *heap_malloc(size_t size, void *user) {
    h2_heap *heap = user;
    if (size >= H2_HEAP_LARGE) {
        // The one block nghttp2 mallocs while it makes the session is its frame buffer (its tables are calloc'd).
        void *block = large_alloc(heap, size, heap->creating);
        if (block) return block;
    }
    return small_alloc(heap, size);
}

static void heap_free(void *ptr, void *user) {
    h2_heap *heap = user;
    if (!ptr) return;
    int index = find(heap, ptr);
    if (index >= 0) {
        large_free(heap, index);
        return;
    }
    small_free(heap, ptr);
}

static void *heap_calloc(size_t count, size_t size, void *user) {
    h2_heap *heap = user;
    if (size != 0 && count > (size_t)-1 / size) return NULL;
    size_t total = count * size;
    if (total >= H2_HEAP_LARGE) {
        void *block = large_alloc(heap, total, 0);  // fresh anonymous pages are zero
        if (block) return block;
    }
    // Past the kept sizes calloc zeroes by itself, and leaves a fresh big block's pages untouched (a memset would
    // make them all resident, for good); a kept block is not zero.
    if (!heap->cache || total > H2_SMALL_MAX) return calloc(1, total);
    void *block = small_alloc(heap, total);
    if (block) memset(block, 0, total);
    return block;
}

static void *heap_realloc(void *ptr, size_t size, void *user) {
    h2_heap *heap = user;
    if (!ptr) return heap_malloc(size, user);
    int index = find(heap, ptr);
    size_t old_size = index >= 0 ? heap->blocks[index].length : malloc_usable_size(ptr);
    if (size <= old_size && (index >= 0 ? size >= H2_HEAP_LARGE : size < H2_HEAP_LARGE)) return ptr;
    void *fresh = heap_malloc(size, user);
    if (!fresh) return NULL;
    memcpy(fresh, ptr, old_size < size ? old_size : size);
    heap_free(ptr, user);
    return fresh;
}

h2_heap *h2_heap_new(h2_block_cache *cache) {
    h2_heap *heap = calloc(1, sizeof(h2_heap));
    if (heap) heap->cache = cache;
    return heap;
}

void h2_heap_free(h2_heap *heap) {
    while (heap->count > 0) large_free(heap, heap->count - 1);
    free(heap);
}

nghttp2_mem h2_heap_mem(h2_heap *heap) {
    return (nghttp2_mem){heap, heap_malloc, heap_free, heap_calloc, heap_realloc};
}

void h2_heap_begin_session(h2_heap *heap) { heap->creating = 1; }

int h2_heap_end_session(h2_heap *heap) {
    heap->creating = 0;
    int discardable = 0;
    for (int i = 0; i < heap->count; i++) discardable += heap->blocks[i].discardable;
    if (discardable != 1) {
        // Not the one frame buffer nghttp2 1.52 makes: a system's other version that mallocs another large block
        // while creating the session would have it zeroed by the trim. Only zero pages are given back then.
        for (int i = 0; i < heap->count; i++) heap->blocks[i].discardable = 0;
    }
    return discardable;
}

// Gives back the pages of a block that are resident and hold only zeros (an emptied table): what comes back on
// the next touch is a zero page, so nothing the block holds changes. Pages not resident are not read (a read would
// fault them in).
static void discard_zero_pages(const h2_large_block *block) {
    size_t pages = block->length / page_size();
    for (size_t page = 0; page < pages; page++) {
        char *start = (char *)block->base + page * page_size();
        unsigned char resident = 0;
        if (mincore(start, page_size(), &resident) != 0 || !(resident & 1)) continue;
        const uint64_t *words = (const uint64_t *)start;
        uint64_t any = 0;
        for (size_t k = 0; k < page_size() / sizeof(uint64_t); k++) any |= words[k];
        if (any == 0) madvise(start, page_size(), MADV_DONTNEED);
    }
}

void h2_heap_trim(h2_heap *heap) {
    for (int i = 0; i < heap->count; i++) {
        if (heap->blocks[i].discardable) {
            madvise(heap->blocks[i].base, heap->blocks[i].length, MADV_DONTNEED);
        } else {
            discard_zero_pages(&heap->blocks[i]);
        }
    }
}

size_t h2_heap_large_bytes(const h2_heap *heap) {
    size_t bytes = 0;
    for (int i = 0; i < heap->count; i++) bytes += heap->blocks[i].length;
    return bytes;
}

static size_t resident_bytes(const h2_heap *heap, int frame_buffer_only) {
    size_t resident = 0;
    for (int i = 0; i < heap->count; i++) {
        if (frame_buffer_only && !heap->blocks[i].discardable) continue;
        size_t pages = heap->blocks[i].length / page_size();
        unsigned char vector[64];
        for (size_t first = 0; first < pages; first += sizeof(vector)) {
            size_t n = pages - first < sizeof(vector) ? pages - first : sizeof(vector);
            if (mincore((char *)heap->blocks[i].base + first * page_size(), n * page_size(), vector) != 0) break;
            for (size_t k = 0; k < n; k++) resident += (vector[k] & 1) ? page_size() : 0;
        }
    }
    return resident;
}

size_t h2_heap_resident_frame_bytes(const h2_heap *heap) { return resident_bytes(heap, 1); }

size_t h2_heap_resident_large_bytes(const h2_heap *heap) { return resident_bytes(heap, 0); }
