import CZlib
import GRPCCMReactor
import GRPCCMWire

/// Compresses request messages with zlib, from any thread (a call's request is compressed on the thread that starts
/// it, a streamed message on the thread that writes it, so the loop does not pay for it).
///
/// A zlib deflate state costs about 256 KiB and its set-up more than compressing a small message, so finished
/// states wait in a small free list per algorithm (`deflateReset` makes one as good as new) instead of being freed.
package enum MessageCompressor {
    /// Free deflate states, per algorithm; at most `keep` each (more threads compressing at once make their own).
    /// A pthread mutex, as everywhere in this package: ThreadSanitizer sees through it (not through
    /// Synchronization.Mutex's raw futexes).
    private static let free = PThreadLock<[CallCompression: [Deflater]]>([:])
    private static let keep = 4

    /// `message` compressed with `algorithm` (`identity` returns it as it is).
    package static func compress(_ message: [UInt8], with algorithm: CallCompression) -> [UInt8] {
        if algorithm == .identity { return message }
        let deflater = Self.free.withLock { $0[algorithm]?.popLast() } ?? Deflater(algorithm)
        let output = deflater.compress(message)
        Self.free.withLock { free in
            if free[algorithm, default: []].count < Self.keep { free[algorithm, default: []].append(deflater) }
        }
        return output
    }
}

/// One zlib deflate state. `@unchecked Sendable`: used by one thread at a time, handed over through the free list's
/// lock.
private final class Deflater: @unchecked Sendable {
    private let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)

    init(_ algorithm: CallCompression) {
        self.stream.initialize(to: z_stream())
        // 15-bit window; +16 writes the gzip wrapper instead of zlib's.
        let rc = czlib_deflate_init(self.stream, Z_DEFAULT_COMPRESSION, algorithm == .gzip ? 15 + 16 : 15)
        // Fails only without memory (or with a zlib too old for these parameters): nothing sensible to go on with.
        precondition(rc == Z_OK, "zlib deflateInit2 failed (\(rc))")
    }

    deinit {
        deflateEnd(self.stream)
        self.stream.deallocate()
    }

    func compress(_ input: [UInt8]) -> [UInt8] {
        defer { deflateReset(self.stream) }
        let bound = Int(deflateBound(self.stream, uLong(input.count)))
        var output = [UInt8](repeating: 0, count: bound)
        let produced = input.withUnsafeBufferPointer { source -> Int in
            output.withUnsafeMutableBufferPointer { target -> Int in
                // zlib does not write through next_in; the mutable pointer is its API's.
                self.stream.pointee.next_in = UnsafeMutablePointer(mutating: source.baseAddress)
                self.stream.pointee.avail_in = uInt(source.count)
                self.stream.pointee.next_out = target.baseAddress
                self.stream.pointee.avail_out = uInt(target.count)
                // One call finishes the stream: the output holds deflateBound bytes.
                let rc = deflate(self.stream, Z_FINISH)
                precondition(rc == Z_STREAM_END, "zlib deflate did not finish within deflateBound (\(rc))")
                return target.count - Int(self.stream.pointee.avail_out)
            }
        }
        output.removeLast(bound - produced)
        return output
    }
}
