/// Writes the 5-byte prefix of a message.
package enum MessageFramer {
    package static func prefix(length: Int, compressed: Bool = false) -> (UInt8, UInt8, UInt8, UInt8, UInt8) {
        let value = UInt32(truncatingIfNeeded: length)
        return (
            compressed ? 1 : 0, UInt8(value >> 24), UInt8(truncatingIfNeeded: value >> 16),
            UInt8(truncatingIfNeeded: value >> 8), UInt8(truncatingIfNeeded: value)
        )
    }

    /// Copies `message`'s framed form (the 5-byte prefix, then the payload) from byte `offset` of that form into
    /// `buffer`, at most `capacity` bytes, and advances `offset`. The prefix never touches the heap.
    /// - Returns: The bytes copied.
    package static func copyFramed(
        _ message: [UInt8], compressed: Bool = false, offset: inout Int, into buffer: UnsafeMutablePointer<UInt8>,
        capacity: Int
    ) -> Int {
        var written = 0
        Self.emitFramed(message, compressed: compressed, offset: &offset, capacity: capacity) { piece in
            UnsafeMutableRawPointer(buffer + written).copyMemory(from: piece.baseAddress!, byteCount: piece.count)
            written += piece.count
        }
        return written
    }

    /// Hands `message`'s framed form from byte `offset` of that form, at most `capacity` bytes, to `sink` in at most
    /// two pieces (what is left of the prefix, then the payload's part), and advances `offset`.
    /// - Returns: The bytes handed over.
    @inline(__always)
    package static func emitFramed(
        _ message: [UInt8], compressed: Bool = false, offset: inout Int, capacity: Int,
        to sink: (UnsafeRawBufferPointer) -> Void
    ) -> Int {
        var handed = 0
        if offset < 5 {
            var prefix = Self.prefix(length: message.count, compressed: compressed)
            let count = min(5 - offset, capacity)
            if count > 0 {
                withUnsafeBytes(of: &prefix) { bytes in
                    sink(UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + count)]))
                }
            }
            handed = count
            offset += count
        }
        let bodyStart = offset - 5
        let take = min(capacity - handed, message.count - bodyStart)
        if take > 0 {
            message.withUnsafeBytes { source in
                sink(UnsafeRawBufferPointer(rebasing: source[bodyStart..<(bodyStart + take)]))
            }
            handed += take
            offset += take
        }
        return handed
    }

    package static func frame(_ message: [UInt8], compressed: Bool = false) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(message.count + 5)
        let p = Self.prefix(length: message.count, compressed: compressed)
        out.append(p.0)
        out.append(p.1)
        out.append(p.2)
        out.append(p.3)
        out.append(p.4)
        out.append(contentsOf: message)
        return out
    }
}
