import CZlib
import GRPCCMWire

#if canImport(Glibc)
import Glibc
#endif

/// Inflates response messages, bounded: a message that would inflate past the receive limit stops as soon as it
/// passes it, so a small "compression bomb" costs at most the limit in memory and the work to reach it.
///
/// One per loop (`Reactor.shared`): responses are decoded on the loop thread, and one inflate state (about 7 KiB
/// plus a 32 KiB window) serves all of its calls, reset between messages.
/// `@unchecked Sendable`: touched only on its loop's thread.
package final class MessageDecompressor: @unchecked Sendable {
    /// Why a message could not be inflated; the caller turns it into a status.
    package enum Failure: Error, Equatable, CustomStringConvertible {
        /// The message inflates to more than `limit` bytes.
        case tooLarge(limit: Int)
        /// The bytes are not a complete stream of the algorithm (corrupt or truncated).
        case corrupt(String)

        package var description: String {
            switch self {
            case .tooLarge(let limit): "decompressed message exceeds the receive limit of \(limit) bytes"
            case .corrupt(let reason): reason
            }
        }
    }

    private let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
    private var initialised = false
    /// Where `inflatedSize` lets zlib write what it then drops; made on first use.
    private var scratch: UnsafeMutableBufferPointer<UInt8>?

    package init() {
        self.stream.initialize(to: z_stream())
    }

    deinit {
        if self.initialised { inflateEnd(self.stream) }
        self.stream.deallocate()
        self.scratch?.deallocate()
    }

    /// The most one message inflates to, whatever the receive limit (a call may ask for `Int.max`): zlib counts its
    /// output room in 32 bits, and a room of 4 GiB or more would not convert (a trap, not an error).
    package static let largestInflated = Int(UInt32.max) - 1

    /// `message` inflated with `algorithm`, at most `limit` bytes (and at most `largestInflated`).
    package func decompress(_ message: [UInt8], with algorithm: CallCompression, limit: Int) throws(Failure) -> [UInt8] {
        if algorithm == .identity { return message }
        try self.begin(algorithm)
        let limit = min(limit, Self.largestInflated)
        // The output grows as it fills, never past limit + 1 bytes (the one byte more proves the limit is passed).
        let cap = limit + 1
        var output = [UInt8](repeating: 0, count: min(cap, max(message.count * 4, 256)))
        var produced = 0
        var rc: Int32 = Z_OK
        message.withUnsafeBufferPointer { source in
            self.stream.pointee.next_in = UnsafeMutablePointer(mutating: source.baseAddress)
            self.stream.pointee.avail_in = uInt(source.count)
            while true {
                rc = output.withUnsafeMutableBufferPointer { target -> Int32 in
                    self.stream.pointee.next_out = target.baseAddress! + produced
                    self.stream.pointee.avail_out = uInt(target.count - produced)
                    let rc = inflate(self.stream, Z_NO_FLUSH)
                    produced = target.count - Int(self.stream.pointee.avail_out)
                    return rc
                }
                if self.nextMember(after: rc, algorithm, produced: produced, limit: limit) {
                    rc = Z_OK
                    if produced < output.count { continue }
                }
                guard rc == Z_OK, produced == output.count, output.count < cap else { break }
                // Out of room with more to come: grow (double, up to the cap), copying what is there.
                let old = output
                output = [UInt8](unsafeUninitializedCapacity: min(cap, old.count * 2)) { buffer, count in
                    _ = old.withUnsafeBufferPointer { memcpy(buffer.baseAddress!, $0.baseAddress!, $0.count) }
                    count = buffer.count
                }
            }
            self.stream.pointee.next_in = nil
        }
        if produced > limit { throw .tooLarge(limit: limit) }
        try self.end(rc, algorithm)
        output.removeLast(output.count - produced)
        return output
    }

    /// How many bytes `message` inflates to, with every check `decompress` makes, keeping none of them: a message
    /// held compressed for now (a slow reader's backlog) is known good, and its size known, when it is accepted.
    package func inflatedSize(_ message: [UInt8], with algorithm: CallCompression, limit: Int) throws(Failure) -> Int {
        if algorithm == .identity { return message.count }
        try self.begin(algorithm)
        let limit = min(limit, Self.largestInflated)
        let scratch = self.scratch ?? UnsafeMutableBufferPointer<UInt8>.allocate(capacity: 16 << 10)
        self.scratch = scratch
        var produced = 0
        var rc: Int32 = Z_OK
        message.withUnsafeBufferPointer { source in
            self.stream.pointee.next_in = UnsafeMutablePointer(mutating: source.baseAddress)
            self.stream.pointee.avail_in = uInt(source.count)
            while true {
                self.stream.pointee.next_out = scratch.baseAddress
                self.stream.pointee.avail_out = uInt(scratch.count)
                rc = inflate(self.stream, Z_NO_FLUSH)
                produced += scratch.count - Int(self.stream.pointee.avail_out)
                if self.nextMember(after: rc, algorithm, produced: produced, limit: limit) { continue }
                // Z_OK with room left over: the input ran out before the end (truncated), as in `decompress`.
                guard rc == Z_OK && self.stream.pointee.avail_out == 0 && produced <= limit else { break }
            }
            self.stream.pointee.next_in = nil
        }
        if produced > limit { throw .tooLarge(limit: limit) }
        try self.end(rc, algorithm)
        return produced
    }

    /// Whether inflating goes on with the next gzip member: RFC 1952 lets members follow each other in one stream
    /// (`cat a.gz b.gz`), and Go's and Java's readers inflate them all, so a message compressed that way is read
    /// whole. Other bytes after a member, and anything after a zlib ("deflate") stream, are refused in `end`.
    private func nextMember(after rc: Int32, _ algorithm: CallCompression, produced: Int, limit: Int) -> Bool {
        guard rc == Z_STREAM_END, algorithm == .gzip, self.stream.pointee.avail_in >= 2, produced <= limit,
            let next = self.stream.pointee.next_in, next[0] == 0x1F, next[1] == 0x8B  // a member's magic, else junk
        else { return false }
        return inflateReset(self.stream) == Z_OK
    }

    /// Starts (or restarts) the inflate state for one message.
    private func begin(_ algorithm: CallCompression) throws(Failure) {
        let windowBits: Int32 = algorithm == .gzip ? 15 + 16 : 15
        if !self.initialised {
            guard czlib_inflate_init(self.stream, windowBits) == Z_OK else { throw .corrupt("zlib could not start") }
            self.initialised = true
        } else if inflateReset2(self.stream, windowBits) != Z_OK {
            throw .corrupt("zlib could not reset")
        }
    }

    /// What the last `inflate` return code says of the message, once the limit is known not to be passed.
    private func end(_ rc: Int32, _ algorithm: CallCompression) throws(Failure) {
        switch rc {
        case Z_STREAM_END:
            if self.stream.pointee.avail_in != 0 {
                throw .corrupt("\(self.stream.pointee.avail_in) bytes after the end of the \(algorithm) stream")
            }
        case Z_OK, Z_BUF_ERROR:
            throw .corrupt("the \(algorithm) stream is truncated")
        default:
            let reason = self.stream.pointee.msg.map { String(cString: $0) } ?? "error \(rc)"
            throw .corrupt("not a valid \(algorithm) stream: \(reason)")
        }
    }
}
