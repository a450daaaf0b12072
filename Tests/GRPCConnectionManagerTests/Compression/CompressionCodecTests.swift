import Testing

@testable import GRPCCMCompression
@testable import GRPCCMWire

/// The zlib codec on its own: round trips, the bound on inflation, and bytes that are not what they claim.
@Suite("Compression codec")
struct CompressionCodecTests {
    static func sample(_ count: Int) -> [UInt8] {
        var state: UInt32 = 0x1234_5678
        return (0..<count).map { index in
            // Half random, half repetitive: compressible, but not trivially.
            state = state &* 1_664_525 &+ 1_013_904_223
            return index % 2 == 0 ? UInt8(truncatingIfNeeded: state >> 24) : UInt8(index % 7)
        }
    }

    @Test("gzip and deflate round trip, with their own wrappers", arguments: [CallCompression.gzip, .deflate])
    func roundTrip(_ algorithm: CallCompression) throws {
        let decompressor = MessageDecompressor()
        for size in [0, 1, 100, 70_000, 1 << 20] {
            let message = Self.sample(size)
            let compressed = MessageCompressor.compress(message, with: algorithm)
            if algorithm == .gzip {
                #expect(Array(compressed.prefix(2)) == [0x1F, 0x8B], "gzip magic")
            } else {
                #expect(compressed.first == 0x78, "zlib header")
            }
            #expect(try decompressor.decompress(compressed, with: algorithm, limit: 4 << 20) == message, "size \(size)")
        }
        // One algorithm's bytes are not the other's.
        let other: CallCompression = algorithm == .gzip ? .deflate : .gzip
        let compressed = MessageCompressor.compress([1, 2, 3], with: other)
        #expect(throws: MessageDecompressor.Failure.self) {
            try decompressor.decompress(compressed, with: algorithm, limit: 100)
        }
    }

    @Test("a receive limit past what zlib can count (Int.max: no limit) inflates as the largest it can")
    func limitPastZlib() throws {
        let message = Self.sample(70_000)
        let decompressor = MessageDecompressor()
        for limit in [Int.max, Int.max - 1, Int(UInt32.max), MessageDecompressor.largestInflated] {
            #expect(try decompressor.decompress(MessageCompressor.compress(message, with: .gzip), with: .gzip, limit: limit) == message)
            #expect(try decompressor.inflatedSize(MessageCompressor.compress(message, with: .deflate), with: .deflate, limit: limit) == message.count)
        }
    }

    @Test("identity passes messages through untouched")
    func identity() throws {
        #expect(MessageCompressor.compress([9, 8, 7], with: .identity) == [9, 8, 7])
        #expect(try MessageDecompressor().decompress([9, 8, 7], with: .identity, limit: 1) == [9, 8, 7])
    }

    @Test("a small message that inflates past the limit stops at the limit")
    func bomb() throws {
        // 64 MiB of zeros is about 64 KiB of gzip.
        let bomb = MessageCompressor.compress([UInt8](repeating: 0, count: 64 << 20), with: .gzip)
        #expect(bomb.count < 200_000)
        let decompressor = MessageDecompressor()
        #expect(throws: MessageDecompressor.Failure.tooLarge(limit: 1 << 20)) {
            try decompressor.decompress(bomb, with: .gzip, limit: 1 << 20)
        }
        // Exactly at the limit is fine; one byte more is not.
        let exact = MessageCompressor.compress([UInt8](repeating: 7, count: 1000), with: .deflate)
        #expect(try decompressor.decompress(exact, with: .deflate, limit: 1000).count == 1000)
        #expect(throws: MessageDecompressor.Failure.tooLarge(limit: 999)) {
            try decompressor.decompress(exact, with: .deflate, limit: 999)
        }
        // And the state is good for the next message.
        #expect(try decompressor.decompress(MessageCompressor.compress([1], with: .gzip), with: .gzip, limit: 10) == [1])
    }

    @Test("a gzip message of several members (RFC 1952) inflates to all of them, within the limit; zlib has one part")
    func gzipMembers() throws {
        let decompressor = MessageDecompressor()
        let (a, b) = (Self.sample(3000), [UInt8](repeating: 9, count: 2000))
        let two = MessageCompressor.compress(a, with: .gzip) + MessageCompressor.compress(b, with: .gzip)
        #expect(try decompressor.decompress(two, with: .gzip, limit: 1 << 20) == a + b)
        #expect(try decompressor.inflatedSize(two, with: .gzip, limit: 1 << 20) == 5000)
        // The limit is on the whole message, across members.
        #expect(throws: MessageDecompressor.Failure.tooLarge(limit: 4000)) {
            try decompressor.decompress(two, with: .gzip, limit: 4000)
        }
        #expect(throws: MessageDecompressor.Failure.tooLarge(limit: 4000)) {
            try decompressor.inflatedSize(two, with: .gzip, limit: 4000)
        }
        // A second member cut short is a truncated message.
        #expect(throws: MessageDecompressor.Failure.self) { try decompressor.decompress(Array(two.dropLast(4)), with: .gzip, limit: 1 << 20) }
        // Two zlib streams back to back are not one.
        let zlib = MessageCompressor.compress(a, with: .deflate) + MessageCompressor.compress(b, with: .deflate)
        #expect(throws: MessageDecompressor.Failure.self) { try decompressor.decompress(zlib, with: .deflate, limit: 1 << 20) }
        #expect(try decompressor.decompress(MessageCompressor.compress([1], with: .gzip), with: .gzip, limit: 10) == [1])
    }

    @Test("corrupt, truncated and over-long streams are refused with a reason")
    func corrupt() throws {
        let decompressor = MessageDecompressor()
        let good = MessageCompressor.compress(Self.sample(5000), with: .gzip)
        for (bytes, expected) in [
            ([1, 2, 3, 4, 5, 6] as [UInt8], "not a valid gzip stream"),
            (Array(good.prefix(good.count / 2)), "truncated"),
            ([], "truncated"),
            (good + [0, 0, 0], "after the end"),
        ] {
            do {
                _ = try decompressor.decompress(bytes, with: .gzip, limit: 1 << 20)
                Issue.record("accepted \(bytes.count) bad bytes")
            } catch {
                guard case .corrupt(let reason) = error else {
                    Issue.record("\(error)")
                    continue
                }
                #expect(reason.contains(expected), "\(reason)")
            }
        }
        #expect(try decompressor.decompress(good, with: .gzip, limit: 1 << 20) == Self.sample(5000))
    }

    @Test(
        "inflatedSize agrees with decompress on every input: the size, or the same refusal",
        arguments: [CallCompression.gzip, .deflate])
    func inflatedSizeAgrees(_ algorithm: CallCompression) throws {
        let decompressor = MessageDecompressor()
        let large = MessageCompressor.compress([UInt8](repeating: 7, count: 3 << 20), with: algorithm)
        let good = MessageCompressor.compress(Self.sample(5000), with: algorithm)
        let inputs: [[UInt8]] = [
            good, large, [1, 2, 3, 4, 5, 6], Array(good.prefix(good.count / 2)), [], good + [0, 0, 0],
            MessageCompressor.compress([], with: algorithm),
        ]
        for bytes in inputs {
            for limit in [1 << 20, 4 << 20, 4999, 5000] {
                let size = Result { () throws(MessageDecompressor.Failure) in
                    try decompressor.inflatedSize(bytes, with: algorithm, limit: limit)
                }
                let inflated = Result { () throws(MessageDecompressor.Failure) in
                    try decompressor.decompress(bytes, with: algorithm, limit: limit).count
                }
                #expect(size == inflated, "\(bytes.count) bytes, limit \(limit)")
            }
        }
    }

    @Test("compression from many threads at once (the deflate free list)")
    func concurrent() async {
        await withTaskGroup(of: Bool.self) { group in
            for task in 0..<16 {
                group.addTask {
                    let decompressor = MessageDecompressor()
                    for round in 0..<50 {
                        let message = Self.sample(1000 + task * 10 + round)
                        let algorithm: CallCompression = round % 2 == 0 ? .gzip : .deflate
                        let back = try? decompressor.decompress(
                            MessageCompressor.compress(message, with: algorithm), with: algorithm, limit: 1 << 20)
                        if back != message { return false }
                    }
                    return true
                }
            }
            for await ok in group { #expect(ok) }
        }
    }
}
