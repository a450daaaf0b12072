import Testing

@testable import GRPCCMWire
@testable import GRPCConnectionManager

/// The hand-written protobuf reading that health responses, etcd's answers and the echo server's requests go
/// through: what a peer sends must never trap it, whatever its varints say.
@Suite("Protobuf wire reading")
struct ProtobufWireTests {
    /// A length-delimited field 1 whose length varint is `length`, followed by `trailing` bytes.
    static func field(length: UInt64, trailing: Int) -> [UInt8] {
        var bytes: [UInt8] = [0x0A]
        ProtobufWire.appendVarint(length, to: &bytes)
        return bytes + [UInt8](repeating: 0x61, count: trailing)
    }

    @Test("values round trip; a length past what is there is malformed, not a trap, up to 2^64 - 1")
    func lengths() {
        let value = ProtobufWire.lengthDelimited(1, Array("echo".utf8)) + ProtobufWire.varintField(2, 300)
        var fields: [String] = []
        #expect(ProtobufWire.forEachField(value[...]) { number, field in fields.append("\(number): \(field)") })
        #expect(fields == ["1: bytes(ArraySlice([101, 99, 104, 111]))", "2: varint(300)"])
        #expect(ProtobufWire.lastLengthDelimited(1, in: value) == Array("echo".utf8)[...])
        for length in [5, UInt64(Int.max) - 1, UInt64(Int.max), 1 << 63, UInt64.max] {
            let bytes = Self.field(length: length, trailing: 4)
            #expect(!ProtobufWire.forEachField(bytes[...]) { _, _ in }, "length \(length)")
            #expect(ProtobufWire.lastLengthDelimited(1, in: bytes) == nil, "length \(length)")
        }
        #expect(ProtobufWire.lastLengthDelimited(1, in: Self.field(length: 4, trailing: 4)) == Array("aaaa".utf8)[...])
    }

    @Test("a health status past Int's range, or unknown, reads UNKNOWN; fields it does not know are skipped; truncated bytes are not a response")
    func healthStatus() {
        #expect(HealthProto.decodeResponse(HealthProto.encodeResponse(.serving)) == .serving)
        #expect(HealthProto.decodeResponse([0x08, 0x07]) == .unknown)
        #expect(HealthProto.decodeResponse([0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]) == .unknown)
        #expect(HealthProto.decodeResponse([0x08, 0xFF]) == nil)
        // Fields it does not know are skipped: a string field 2, a fixed64 field 3, a varint field 100 (two-byte key).
        #expect(HealthProto.decodeResponse([0x08, 0x01, 0x12, 0x02, 0x68, 0x69]) == .serving)
        #expect(HealthProto.decodeResponse([0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x08, 0x02]) == .notServing)
        #expect(HealthProto.decodeResponse([0xA0, 0x06, 0x05, 0x08, 0x01]) == .serving)
        #expect(HealthProto.decodeResponse([0x08, 0x01, 0x12, 0x05, 0x68]) == nil, "a string field cut short")
        #expect(HealthProto.decodeRequest(Self.field(length: UInt64.max, trailing: 2)) == "")
    }

    @Test("etcd answers with impossible lengths are refused, not trapped on")
    func etcdAnswers() {
        #expect(EtcdMessages.rangeResponse(Self.field(length: 1 << 63, trailing: 8)) == nil)
        let lease = EtcdMessages.leaseResponse(Self.field(length: UInt64.max, trailing: 8))
        #expect(lease.id == 0)
    }
}
