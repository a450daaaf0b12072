/// Splits a byte stream into gRPC messages: 1 byte compressed flag, 4 bytes big-endian length, then the payload.
///
/// DATA frame boundaries mean nothing to gRPC, so the deframer accepts chunks cut anywhere. A length over
/// `maxMessageSize` is refused as soon as the 5-byte prefix is complete, before any payload is buffered.
struct MessageDeframer {
    /// What went wrong; the owner turns it into a status and resets the stream.
    enum Failure: Error, Equatable {
        /// The prefix announces more than the receive limit.
        case messageTooLarge(length: Int, limit: Int)
        /// The compressed flag is set but no `grpc-encoding` was negotiated.
        case compressedWithoutEncoding
        /// The flag byte is neither 0 nor 1.
        case invalidFlag(UInt8)
    }

    let maxMessageSize: Int
    /// Whether a compressed flag of 1 is acceptable (the peer sent `grpc-encoding`).
    var compressionAllowed = false

    private var prefix: UInt64 = 0
    private var prefixCount = 0
    private var message: [UInt8] = []
    private var remaining = 0
    private var inMessage = false

    init(maxMessageSize: Int) {
        self.maxMessageSize = maxMessageSize
    }

    /// True when bytes of an unfinished message are buffered (a stream ending now is truncated).
    var hasPartialMessage: Bool { self.prefixCount > 0 || self.inMessage }

    /// Feeds `bytes`; calls `onMessage` for every complete message, in order.
    mutating func process(
        _ bytes: UnsafeRawBufferPointer, _ onMessage: (_ message: [UInt8], _ compressed: Bool) -> Void
    ) throws(Failure) {
        var index = 0
        let count = bytes.count
        while index < count {
            if !self.inMessage {
                while self.prefixCount < 5 && index < count {
                    self.prefix = self.prefix << 8 | UInt64(bytes[index])
                    self.prefixCount += 1
                    index += 1
                }
                if self.prefixCount < 5 { return }
                let flag = UInt8(truncatingIfNeeded: self.prefix >> 32)
                let length = Int(UInt32(truncatingIfNeeded: self.prefix))
                self.prefix = 0
                self.prefixCount = 0
                if flag > 1 { throw .invalidFlag(flag) }
                if flag == 1 && !self.compressionAllowed { throw .compressedWithoutEncoding }
                if length > self.maxMessageSize { throw .messageTooLarge(length: length, limit: self.maxMessageSize) }
                if length == 0 {
                    onMessage([], flag == 1)
                    continue
                }
                self.compressedFlag = flag == 1
                self.remaining = length
                self.inMessage = true
                self.message = []
                self.message.reserveCapacity(length)
                // Fast path: the whole message is in this chunk.
            }
            let take = min(self.remaining, count - index)
            self.message.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[index..<(index + take)]))
            index += take
            self.remaining -= take
            if self.remaining == 0 {
                self.inMessage = false
                let message = self.message
                self.message = []
                onMessage(message, self.compressedFlag)
            }
        }
    }

    private var compressedFlag = false
}

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
    static func copyFramed(
        _ message: [UInt8], offset: inout Int, into buffer: UnsafeMutablePointer<UInt8>, capacity: Int
    ) -> Int {
        var written = 0
        if offset < 5 {
            var prefix = Self.prefix(length: message.count)
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

    package static func frame(_ message: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(message.count + 5)
        let p = Self.prefix(length: message.count)
        out.append(p.0)
        out.append(p.1)
        out.append(p.2)
        out.append(p.3)
        out.append(p.4)
        out.append(contentsOf: message)
        return out
    }
}
