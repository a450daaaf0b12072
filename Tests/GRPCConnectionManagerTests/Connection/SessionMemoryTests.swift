import CHTTP2Memory
import Foundation
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMPool
@_spi(Reactor) @testable import GRPCCMReactor
@testable import GRPCCMTransport

/// The allocator of our nghttp2 sessions (CHTTP2Memory) and an idle connection giving its frame buffer back.
@Suite("nghttp2 session memory")
struct SessionMemoryTests {
    @Test("large blocks get pages of their own, move across the threshold with their bytes, and are all freed")
    func allocatorBlocks() throws {
        let heap = try #require(h2_heap_new(nil))
        defer { h2_heap_free(heap) }
        let mem = h2_heap_mem(heap)
        let user = mem.mem_user_data

        let small = try #require(mem.malloc(100, user))
        #expect(h2_heap_large_bytes(heap) == 0)
        let large = try #require(mem.malloc(20_000, user))
        #expect(h2_heap_large_bytes(heap) == 20_480, "rounded up to pages")
        memset(large, 7, 20_000)

        // Grows within its pages, then into a new block, then shrinks back to malloc: the bytes go along.
        let grown = try #require(mem.realloc(large, 30_000, user))
        #expect(h2_heap_large_bytes(heap) == 32_768)
        #expect(grown.load(fromByteOffset: 19_999, as: UInt8.self) == 7)
        let shrunk = try #require(mem.realloc(grown, 64, user))
        #expect(h2_heap_large_bytes(heap) == 0)
        #expect(shrunk.load(fromByteOffset: 63, as: UInt8.self) == 7)

        // A small block that grows past the threshold moves onto pages of its own.
        memset(small, 9, 100)
        let moved = try #require(mem.realloc(small, 10_000, user))
        #expect(h2_heap_large_bytes(heap) == 12_288)
        #expect(moved.load(fromByteOffset: 99, as: UInt8.self) == 9)

        let zeroed = try #require(mem.calloc(3_000, 4, user))
        #expect((0..<12_000).allSatisfy { zeroed.load(fromByteOffset: $0, as: UInt8.self) == 0 })
        #expect(mem.calloc(Int.max, 4, user) == nil, "an overflowing calloc fails instead of wrapping")

        for block in [shrunk, moved, zeroed] { mem.free(block, user) }
        mem.free(nil, user)
        #expect(h2_heap_large_bytes(heap) == 0)
    }

    @Test("past the heap's four page-backed slots, large blocks come from malloc and work the same")
    func allocatorSlotsFull() throws {
        let heap = try #require(h2_heap_new(nil))
        defer { h2_heap_free(heap) }
        let mem = h2_heap_mem(heap)
        let user = mem.mem_user_data
        var blocks: [UnsafeMutableRawPointer] = []
        for index in 0..<6 {
            let block = try #require(mem.malloc(8_000, user))
            memset(block, Int32(index + 1), 8_000)
            blocks.append(block)
        }
        #expect(h2_heap_large_bytes(heap) == 4 * 8_192, "four blocks on pages of their own, two from malloc")
        #expect(blocks[0..<4].allSatisfy { Int(bitPattern: $0) % 4096 == 0 }, "the first four start pages")
        // Slots full: a paged block that grows moves to malloc with its bytes, a malloc'd one grows in malloc, and a
        // calloc'd one is zero.
        blocks[1] = try #require(mem.realloc(blocks[1], 30_000, user))
        #expect(h2_heap_large_bytes(heap) == 3 * 8_192)
        #expect(blocks[1].load(fromByteOffset: 7_999, as: UInt8.self) == 2)
        blocks[1] = try #require(mem.realloc(blocks[1], 8_000, user))
        #expect(h2_heap_large_bytes(heap) == 4 * 8_192, "shrunk but still large: into the slot that came free")
        #expect(blocks[1].load(fromByteOffset: 7_999, as: UInt8.self) == 2)
        blocks[5] = try #require(mem.realloc(blocks[5], 20_000, user))
        #expect(blocks[5].load(fromByteOffset: 7_999, as: UInt8.self) == 6)
        let zeroed = try #require(mem.calloc(3, 4_000, user))
        #expect(h2_heap_large_bytes(heap) == 4 * 8_192)
        #expect((0..<12_000).allSatisfy { zeroed.load(fromByteOffset: $0, as: UInt8.self) == 0 })
        mem.free(zeroed, user)
        // Freeing a paged one frees its slot for the next.
        mem.free(blocks[0], user)
        #expect(h2_heap_large_bytes(heap) == 3 * 8_192)
        blocks[0] = try #require(mem.calloc(1, 5_000, user))
        #expect(h2_heap_large_bytes(heap) == 4 * 8_192)
        for (index, block) in blocks.enumerated() where index != 0 {
            #expect(block.load(fromByteOffset: 4_000, as: UInt8.self) == UInt8(index + 1))
        }
        for block in blocks { mem.free(block, user) }
        #expect(h2_heap_large_bytes(heap) == 0)
    }

    @Test("small blocks are kept for reuse by size across the sessions of a loop, zeroed by calloc, grown in place")
    func allocatorKeepsSmallBlocks() throws {
        let cache = try #require(h2_block_cache_new())
        defer { h2_block_cache_free(cache) }
        let other = try #require(h2_heap_new(cache))
        defer { h2_heap_free(other) }
        let heap = try #require(h2_heap_new(cache))
        defer { h2_heap_free(heap) }
        let mem = h2_heap_mem(heap)
        let user = mem.mem_user_data

        let first = try #require(mem.malloc(100, user))
        memset(first, 0xAB, 100)
        // The block's class is read back from its glibc chunk: 104 usable bytes as a rule, more when glibc hands out
        // a chunk it could not split. Asking for what it holds finds its class whatever the heap's state.
        let usable = Self.mallocUsableSize(first)
        #expect(usable >= 104 && usable <= 128, "\(usable)")
        mem.free(first, user)
        #expect(h2_block_cache_kept(cache) == 1)
        let otherMem = h2_heap_mem(other)
        let again = try #require(otherMem.malloc(usable, otherMem.mem_user_data))
        #expect(again == first, "another session, the same 16-byte class: the kept block")
        #expect(h2_block_cache_kept(cache) == 0)
        otherMem.free(again, otherMem.mem_user_data)

        let zeroed = try #require(mem.calloc(1, usable, user))
        #expect(zeroed == first, "calloc takes the kept block too")
        #expect((0..<usable).allSatisfy { zeroed.load(fromByteOffset: $0, as: UInt8.self) == 0 }, "and zeroes it")
        memset(zeroed, 5, 100)
        let grown = try #require(mem.realloc(zeroed, usable, user))
        #expect(grown == zeroed, "still within its class: grown in place")
        let moved = try #require(mem.realloc(grown, 600, user))
        #expect(moved.load(fromByteOffset: 99, as: UInt8.self) == 5, "past the class: moved with its bytes")
        let big = try #require(mem.malloc(4_000, user))
        mem.free(moved, user)
        mem.free(big, user)
        #expect(h2_block_cache_kept(cache) == 1, "only blocks up to 512 bytes are kept: \(h2_block_cache_kept(cache))")
    }

    /// glibc's `malloc_usable_size` (in <malloc.h>, which the Glibc module does not bring), as the allocator calls it:
    /// found by name, so that under a sanitizer it is the sanitizer's.
    static let mallocUsableSize = unsafeBitCast(
        dlsym(nil, "malloc_usable_size"), to: (@convention(c) (UnsafeMutableRawPointer?) -> Int).self)

    @Test("an idle connection gives back its frame buffer's pages and its emptied stream table's, and the next calls use both again")
    func idleConnectionTrimsFrameBuffer() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.enableRetry = false
        let channel = try fixture.channel(configuration)
        // A stream held open while the pages are read: the idle trim comes a second after the last stream closes,
        // and a loaded machine may take that long between a call's end and the read.
        func holdAStream() async throws -> AsyncStreamingCall {
            let held = channel.bidirectionalStreaming(path: "/test.Stream/Update")
            try await held.write([1])
            var echoes = held.responses.makeAsyncIterator()
            #expect(try await echoes.next() == [1])
            return held
        }
        func release(_ held: AsyncStreamingCall) async {
            held.closeSend()
            #expect(await held.result().status == .ok)
        }
        #expect(await channel.call([1], timeout: .seconds(5)).status == .ok)
        var stream = try await holdAStream()

        @Sendable func memories() -> [HTTP2SessionMemory] {
            channel.inspect { pool in pool.currentTransports.compactMap { ($0 as? HTTP2ClientConnection)?.sessionMemory } }
        }
        let frameBuffer = { @Sendable () -> Int in memories().reduce(0) { $0 + $1.residentFrameBufferBytes } }
        let allLarge = { @Sendable () -> Int in memories().reduce(0) { $0 + $1.residentLargeBytes } }
        let held = memories().reduce(0) { $0 + $1.largeBytes }
        #expect(held >= (16 << 10) + 4096, "nghttp2's frame buffer and stream table are on pages of their own")
        #expect(frameBuffer() > 0, "the call's frames were written into the buffer")
        #expect(allLarge() > frameBuffer(), "the call's stream went into the table")

        // A second after the last stream closed: every page of both is given back.
        await release(stream)
        #expect(waitFor(seconds: 5) { allLarge() == 0 }, "\(allLarge()) bytes still resident")

        stream = try await holdAStream()

        let responses = await withTaskGroup(of: CallStatus.self) { group in
            for index in 0..<64 { group.addTask { await channel.call([UInt8(index)], timeout: .seconds(5)).status } }
            return await group.reduce(into: [CallStatus]()) { $0.append($1) }
        }
        #expect(responses.count == 64 && responses.allSatisfy { $0 == .ok })
        #expect(frameBuffer() > 0, "frames are written into the buffer again")
        #expect(allLarge() > frameBuffer(), "streams go into the table again")
        // 64 streams at once may have grown the table: whatever it became, it is given back too.
        await release(stream)
        #expect(waitFor(seconds: 5) { allLarge() == 0 }, "\(allLarge()) bytes still resident after the burst")
    }

    @Test("trimming gives back only pages that hold zeros, and a page given back reads as zeros again")
    func trimKeepsWhatBlocksHold() throws {
        let heap = try #require(h2_heap_new(nil))
        defer { h2_heap_free(heap) }
        let mem = h2_heap_mem(heap)
        let user = mem.mem_user_data
        let table = try #require(mem.calloc(256, 16, user))
        let kept = try #require(mem.calloc(2, 4096, user))
        #expect(h2_heap_large_bytes(heap) == 3 * 4096)
        // The table is written, then emptied again; the second block keeps a byte in its second page.
        memset(table, 0x5A, 4096)
        memset(table, 0, 4096)
        memset(kept, 0, 8192)
        kept.storeBytes(of: 0x77, toByteOffset: 5000, as: UInt8.self)
        #expect(h2_heap_resident_large_bytes(heap) == 3 * 4096)
        h2_heap_trim(heap)
        #expect(h2_heap_resident_large_bytes(heap) == 4096, "only the page holding a byte stays")
        #expect(kept.load(fromByteOffset: 5000, as: UInt8.self) == 0x77)
        #expect((0..<4096).allSatisfy { table.load(fromByteOffset: $0, as: UInt8.self) == 0 })
        #expect((0..<4096).allSatisfy { kept.load(fromByteOffset: $0, as: UInt8.self) == 0 })
        mem.free(table, user)
        mem.free(kept, user)
    }

    @Test("blocks malloc'd while a session is made are discarded whole only when there is exactly one (nghttp2 1.52's frame buffer)")
    func onlyOneFrameBufferIsDiscardedWhole() throws {
        for count in [1, 2] {
            let heap = try #require(h2_heap_new(nil))
            defer { h2_heap_free(heap) }
            let mem = h2_heap_mem(heap)
            let user = mem.mem_user_data
            h2_heap_begin_session(heap)
            let blocks = try (0..<count).map { _ in try #require(mem.malloc(8192, user)) }
            #expect(h2_heap_end_session(heap) == Int32(count))
            for block in blocks { memset(block, 0x33, 8192) }
            h2_heap_trim(heap)
            // One: the frame buffer, given back whole. Two: an nghttp2 that makes another such block while creating
            // the session, whose contents the trim must not zero.
            let kept = blocks.allSatisfy { block in (0..<8192).allSatisfy { block.load(fromByteOffset: $0, as: UInt8.self) == 0x33 } }
            #expect(kept == (count == 2), "\(count) block(s)")
            for block in blocks { mem.free(block, user) }
        }
    }
}
