import CHTTP2Memory
import CNghttp2

/// The allocator of one nghttp2 session (`CHTTP2Memory`): blocks of a page (4 KiB) and more on pages of their own
/// (four at a time);
/// while its connection is idle (`trim()`), the session's 16 KiB frame buffer and the pages of its emptied stream
/// table given back to the kernel, which is most of what an idle connection would otherwise keep resident; small
/// blocks kept for reuse in its loop's `HTTP2BlockCache`.
///
/// Held by the socket that holds the session, and so freed after the session is deleted (the socket deletes its
/// session first, in `close` or its deinit).
///
/// `@unchecked Sendable`: used on the session's loop thread only.
package final class HTTP2SessionMemory: @unchecked Sendable {
    private let heap: OpaquePointer
    /// Held so that it outlives the heap, which keeps blocks in it.
    private let cache: HTTP2BlockCache

    package init(cache: HTTP2BlockCache) {
        guard let heap = h2_heap_new(cache.cache) else { fatalError("out of memory for an HTTP/2 session's heap") }
        self.heap = heap
        self.cache = cache
    }

    deinit {
        h2_heap_free(self.heap)
    }

    /// Runs `create` (an `nghttp2_session_*_new3`) with this allocator, noting the blocks it allocates as the
    /// session's frame buffer.
    package func makeSession(_ create: (UnsafeMutablePointer<nghttp2_mem>) -> Int32) -> Int32 {
        var mem = h2_heap_mem(self.heap)
        h2_heap_begin_session(self.heap)
        let rc = create(&mem)
        h2_heap_end_session(self.heap)
        return rc
    }

    /// Gives the frame buffer's pages back, and the pages of the emptied stream table. Only when nghttp2 has nothing
    /// to write and what it wrote has been copied out (`HTTP2Socket.trimIdleMemory` checks both).
    package func trim() {
        h2_heap_trim(self.heap)
    }

    /// Bytes of large blocks held (resident or not).
    package var largeBytes: Int { h2_heap_large_bytes(self.heap) }

    /// Bytes of the frame buffer's pages that are resident.
    package var residentFrameBufferBytes: Int { h2_heap_resident_frame_bytes(self.heap) }

    /// Resident bytes of every block on pages of its own (the frame buffer, the stream table), for tests.
    package var residentLargeBytes: Int { h2_heap_resident_large_bytes(self.heap) }
}

/// Small blocks freed by the nghttp2 sessions of one loop, kept for the next ones (`CHTTP2Memory`): one per loop,
/// from `Reactor.shared`.
///
/// `@unchecked Sendable`: used on its loop's thread only.
package final class HTTP2BlockCache: @unchecked Sendable {
    fileprivate let cache: OpaquePointer

    package init() {
        guard let cache = h2_block_cache_new() else { fatalError("out of memory for an HTTP/2 block cache") }
        self.cache = cache
    }

    deinit {
        h2_block_cache_free(self.cache)
    }

    /// Blocks kept.
    package var keptBlocks: Int { h2_block_cache_kept(self.cache) }
}
