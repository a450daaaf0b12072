// CHTTP2Memory: one nghttp2 session's allocator (nghttp2_mem), so that an idle connection keeps little memory
// resident.
//
// nghttp2 allocates its outbound frame buffer (16 KiB and a frame header) and its stream map's table (4 KiB) when a
// session is created and keeps them for the session's life, though an idle connection writes nothing and has no
// stream. Through glibc those blocks share pages with their neighbours and the pages they have ever touched stay
// resident. Here blocks of at least H2_HEAP_LARGE bytes (a page), four at a time (a session holds at most three),
// get pages of their own from mmap: untouched pages cost nothing, and while the connection is idle (h2_heap_trim)
// the frame buffer's pages go back to the kernel, to come back zeroed when the next frame is written, and so do the
// pages of other large blocks that hold only zeros (the emptied stream table), which come back as they were. Smaller
// blocks come from malloc, and those up to 512 bytes are kept for reuse when freed, in a cache shared by the
// sessions of a loop (h2_block_cache): nghttp2 allocates the same few sizes for every stream, and with many streams
// in flight glibc's per-thread cache overflows into its slow paths (about 1,500 instructions per call at 64 in
// flight). At most 256 blocks a size are kept.
//
// One heap per session, used on the session's (the loop's) thread only; freed after nghttp2_session_del.
#ifndef CHTTP2MEMORY_H
#define CHTTP2MEMORY_H

#include <stddef.h>
#include <nghttp2/nghttp2.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Blocks at least this large get pages of their own.
#define H2_HEAP_LARGE 4096

typedef struct h2_heap h2_heap;
typedef struct h2_block_cache h2_block_cache;

/// The small blocks kept for the sessions of one loop (used on that loop's thread only); freed after all of them.
h2_block_cache *_Nullable h2_block_cache_new(void);
void h2_block_cache_free(h2_block_cache *_Nonnull cache);
/// Blocks kept, for tests.
size_t h2_block_cache_kept(const h2_block_cache *_Nonnull cache);

/// A heap for one session, its small blocks kept in `cache` (NULL: none kept); NULL when out of memory.
h2_heap *_Nullable h2_heap_new(h2_block_cache *_Nullable cache);
/// Frees the heap itself: every block must have been freed (nghttp2_session_del frees them).
void h2_heap_free(h2_heap *_Nonnull heap);
/// The allocator to give nghttp2_session_*_new3 (nghttp2 copies it).
nghttp2_mem h2_heap_mem(h2_heap *_Nonnull heap);
/// Between begin and end (around nghttp2_session_*_new3), large blocks allocated with malloc are the session's
/// frame buffer: the ones h2_heap_trim may discard whatever they hold (calloc'd ones are tables). end returns how
/// many there were (nghttp2 1.52 makes one); when not exactly one, none is discarded whole (an nghttp2 that makes
/// others would lose what they hold), and the trim gives back only pages of zeros.
void h2_heap_begin_session(h2_heap *_Nonnull heap);
int h2_heap_end_session(h2_heap *_Nonnull heap);
/// Gives the frame buffer's pages back to the kernel, and the resident pages of other large blocks that hold only
/// zeros. Only when nghttp2 has nothing to write and everything it returned from mem_send has been copied out: the
/// frame buffer holds nothing that will be read again.
void h2_heap_trim(h2_heap *_Nonnull heap);
/// Bytes of large blocks held (pages reserved, resident or not), for tests.
size_t h2_heap_large_bytes(const h2_heap *_Nonnull heap);
/// Bytes of the frame buffer's pages that are resident (mincore), for tests.
size_t h2_heap_resident_frame_bytes(const h2_heap *_Nonnull heap);
/// Bytes of all large blocks' pages that are resident (mincore), for tests.
size_t h2_heap_resident_large_bytes(const h2_heap *_Nonnull heap);

#ifdef __cplusplus
}
#endif

#endif
