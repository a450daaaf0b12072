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
        if offset < 5 {
            var prefix = Self.prefix(length: message.count, compressed: compressed)
            withUnsafeBytes(of: &prefix) { bytes in
                while offset < 5 && written < capacity {
                    buffer[written] = bytes[offset]
                    written += 1
                    offset += 1
                }
            }
        }
        let bodyStart = offset - 5
        let take = min(capacity - written, message.count - bodyStart)
        if take > 0 {
            message.withUnsafeBufferPointer { source in
                (buffer + written).update(from: source.baseAddress! + bodyStart, count: take)
            }
            written += take
            offset += take
        }
        return written
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
