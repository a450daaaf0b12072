import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

@Suite("MessageDeframer")
struct MessageDeframerTests {
    static let messages: [[UInt8]] = [[], [1], Array(0..<200), [9, 9, 9]]
    static var stream: [UInt8] { Self.messages.flatMap { MessageFramer.frame($0) } }

    private func run(_ chunks: [[UInt8]], limit: Int = 1 << 20) throws -> [[UInt8]] {
        var deframer = MessageDeframer(maxMessageSize: limit)
        var out: [[UInt8]] = []
        for chunk in chunks {
            try chunk.withUnsafeBytes { bytes in
                try deframer.process(bytes) { message, _ in out.append(message) }
            }
        }
        #expect(!deframer.hasPartialMessage)
        return out
    }

    @Test("split at every byte boundary yields the same messages")
    func everySplitPoint() throws {
        let stream = Self.stream
        for split in 0...stream.count {
            let out = try self.run([Array(stream[..<split]), Array(stream[split...])])
            #expect(out == Self.messages, "split at \(split)")
        }
    }

    @Test("one byte at a time")
    func byteAtATime() throws {
        #expect(try self.run(Self.stream.map { [$0] }) == Self.messages)
    }

    @Test("an oversized length is refused from the prefix alone")
    func oversized() {
        var deframer = MessageDeframer(maxMessageSize: 100)
        let prefix: [UInt8] = [0, 0, 0, 0, 101]
        #expect(throws: MessageDeframer.Failure.messageTooLarge(length: 101, limit: 100)) {
            try prefix.withUnsafeBytes { try deframer.process($0) { _, _ in } }
        }
    }

    @Test("a message exactly at the limit is accepted")
    func atLimit() throws {
        #expect(try self.run([MessageFramer.frame(Array(repeating: 7, count: 100))], limit: 100).count == 1)
    }

    @Test("a truncated stream leaves a partial message")
    func truncated() throws {
        var deframer = MessageDeframer(maxMessageSize: 100)
        let framed = Array(MessageFramer.frame([1, 2, 3]).dropLast())
        var count = 0
        try framed.withUnsafeBytes { try deframer.process($0) { _, _ in count += 1 } }
        #expect(count == 0)
        #expect(deframer.hasPartialMessage)
        var prefixOnly = MessageDeframer(maxMessageSize: 100)
        try [UInt8]([0, 0]).withUnsafeBytes { try prefixOnly.process($0) { _, _ in } }
        #expect(prefixOnly.hasPartialMessage)
    }

    @Test("compressed flag without grpc-encoding is refused; invalid flags too")
    func compressedFlag() {
        var deframer = MessageDeframer(maxMessageSize: 100)
        #expect(throws: MessageDeframer.Failure.compressedWithoutEncoding) {
            try [UInt8]([1, 0, 0, 0, 0]).withUnsafeBytes { try deframer.process($0) { _, _ in } }
        }
        var other = MessageDeframer(maxMessageSize: 100)
        #expect(throws: MessageDeframer.Failure.invalidFlag(2)) {
            try [UInt8]([2, 0, 0, 0, 0]).withUnsafeBytes { try other.process($0) { _, _ in } }
        }
    }
}
