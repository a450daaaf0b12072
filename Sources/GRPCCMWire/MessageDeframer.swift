/// Splits a byte stream into gRPC messages: 1 byte compressed flag, 4 bytes big-endian length, then the payload.
///
/// DATA frame boundaries mean nothing to gRPC, so the deframer accepts chunks cut anywhere. A length over
/// `maxMessageSize` is refused as soon as the 5-byte prefix is complete, before any payload is buffered. The buffer of
/// a message split over chunks grows with the bytes that arrive, never with the length the prefix announces: a peer
/// that announces 4 MiB and sends 5 bytes costs 5 bytes, not 4 MiB. It grows fourfold (bounded by the announced
/// length), not twofold like an array: a large message is moved about a third of its size while it grows, not once
/// its size.
package struct MessageDeframer: Sendable {
    /// What went wrong; the owner turns it into a status and resets the stream.
    package enum Failure: Error, Equatable, Sendable {
        /// The prefix announces more than the receive limit.
        case messageTooLarge(length: Int, limit: Int)
        /// The compressed flag is set but no `grpc-encoding` the client can decode was negotiated.
        case compressedWithoutEncoding
        /// The flag byte is neither 0 nor 1.
        case invalidFlag(UInt8)
    }

    package let maxMessageSize: Int
    /// Whether a compressed flag of 1 is acceptable (the peer sent a `grpc-encoding` the client offered).
    package var compressionAllowed = false

    private var prefix: UInt64 = 0
    private var prefixCount = 0
    private var message: [UInt8] = []
    private var remaining = 0
    private var inMessage = false
    private var compressedFlag = false

    package init(maxMessageSize: Int) {
        self.maxMessageSize = maxMessageSize
    }

    /// True when bytes of an unfinished message are buffered (a stream ending now is truncated).
    ///
    /// Stored, and set as `process` returns, rather than computed: an owner holds its deframer in a class's stored
    /// property, and a getter called from another module was handed a copy of the whole deframer (its buffer retained
    /// and released around the call); a stored field is read in place. (`@inlinable` did not help: the getter was
    /// not inlined across the package's modules.)
    package private(set) var hasPartialMessage = false

    /// Bytes buffered for the unfinished message, and the storage reserved for them (tests of the growth rule).
    package var bufferedBytes: Int { self.message.count }
    package var bufferedCapacity: Int { self.message.capacity }

    /// Feeds `bytes`; calls `onMessage` for every complete message, in order.
    package mutating func process(
        _ bytes: UnsafeRawBufferPointer, _ onMessage: (_ message: [UInt8], _ compressed: Bool) -> Void
    ) throws(Failure) {
        defer { self.hasPartialMessage = self.prefixCount > 0 || self.inMessage }
        var index = 0
        let count = bytes.count
        while index < count {
            if !self.inMessage {
                let flag: UInt8
                let length: Int
                if self.prefixCount == 0 && count - index >= 5 {
                    // The whole prefix in this chunk (nearly always): read at once, not a byte at a time through the
                    // stored partial prefix (about 70 instructions a message).
                    flag = bytes[index]
                    length = Int(bytes[index + 1]) << 24 | Int(bytes[index + 2]) << 16 | Int(bytes[index + 3]) << 8
                        | Int(bytes[index + 4])
                    index += 5
                } else {
                    while self.prefixCount < 5 && index < count {
                        self.prefix = self.prefix << 8 | UInt64(bytes[index])
                        self.prefixCount += 1
                        index += 1
                    }
                    if self.prefixCount < 5 { return }
                    flag = UInt8(truncatingIfNeeded: self.prefix >> 32)
                    length = Int(UInt32(truncatingIfNeeded: self.prefix))
                    self.prefix = 0
                    self.prefixCount = 0
                }
                if flag > 1 { throw .invalidFlag(flag) }
                if flag == 1 && !self.compressionAllowed { throw .compressedWithoutEncoding }
                if length > self.maxMessageSize { throw .messageTooLarge(length: length, limit: self.maxMessageSize) }
                if length <= count - index {
                    // Fast path: the whole message is in this chunk, copied once into an array of its size.
                    let message = Array(UnsafeRawBufferPointer(rebasing: bytes[index..<(index + length)]))
                    index += length
                    onMessage(message, flag == 1)
                    continue
                }
                self.compressedFlag = flag == 1
                self.remaining = length
                self.inMessage = true
                self.message = []
            }
            let take = min(self.remaining, count - index)
            self.reserve(take)
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

    /// Makes room for `count` more bytes of the current message: four times what it holds, at most the announced
    /// length, and all of that length when a step would leave less than a quarter of it for one more (which would
    /// move the whole message again for a few bytes; the allocator's rounding hides that step or not). So at most
    /// five times what has arrived.
    private mutating func reserve(_ count: Int) {
        let needed = self.message.count + count
        guard needed > self.message.capacity else { return }
        let announced = self.message.count + self.remaining
        var target = min(announced, max(needed, self.message.capacity * 4))
        if announced - target < target / 4 { target = announced }
        self.message.reserveCapacity(target)
    }
}
