import Testing

@testable import GRPCCMWire

/// A response's header blocks against HTTP/2's rules for responses (RFC 9113 §8.1.1, 8.2, 8.3.2): what nghttp2
/// checked before the client's sessions switched its HTTP checks off, field by field and block by block.
@Suite("ResponseHead: HTTP/2 rules")
struct ResponseHeadTests {
    /// A block: fields, then whether it ends the stream.
    typealias Block = (fields: [(String, String)], endStream: Bool)

    /// Feeds the blocks; returns how the last one ended (or `.malformed` as soon as a field is refused) and the head.
    static func read(_ blocks: [Block]) -> (ResponseHead.Block, ResponseHead) {
        var head = ResponseHead(maxHeaderListSize: 16 << 10)
        var last = ResponseHead.Block.headers
        for block in blocks {
            head.beginBlock()
            for (name, value) in block.fields {
                let accepted = Array(name.utf8).withUnsafeBufferPointer { n in
                    Array(value.utf8).withUnsafeBufferPointer { v in head.header(name: n, value: v) }
                }
                if !accepted { return (.malformed, head) }
            }
            last = head.endBlock(endStream: block.endStream)
            if last == .malformed { return (last, head) }
        }
        return (last, head)
    }

    static let ok: [(String, String)] = [(":status", "200"), ("content-type", "application/grpc")]
    static let trailers: Block = (fields: [("grpc-status", "0")], endStream: true)

    @Test("a well-formed response: headers, trailers, 1xx blocks before, metadata of every kind")
    func wellFormed() {
        let (end, head) = Self.read([
            (fields: [(":status", "100")], endStream: false),
            (fields: Self.ok + [("x-id", "7"), ("x-tab", "a\tb"), ("content-length", "12"), ("te", "trailers")], endStream: false),
            (fields: [("grpc-status", "0"), ("grpc-message", "fine"), ("x-after", "v")], endStream: true),
        ])
        #expect(end == .trailers)
        #expect(head.malformation == nil)
        #expect(head.httpStatus == 200 && head.grpcStatus == 0 && head.grpcContentType)
        #expect(head.initialMetadata["x-id"] == "7" && head.initialMetadata["x-tab"] == "a\tb")
        #expect(head.trailingMetadata["x-after"] == "v")
        let (only, onlyHead) = Self.read([(fields: Self.ok + [("grpc-status", "5")], endStream: true)])
        #expect(only == .trailersOnly && onlyHead.grpcStatus == 5)
    }

    @Test("malformed fields and blocks are refused with a reason", arguments: [
        ("upper-case name", [(fields: ok + [("X-Upper", "v")], endStream: false)] as [Block], "upper-case"),
        ("CR LF in a value", [(fields: ok + [("x-bad", "a\r\nx-injected: 1")], endStream: false)], "value of"),
        ("NUL in a value", [(fields: ok + [("x-bad", "a\u{0}b")], endStream: false)], "value of"),
        ("space around a value", [(fields: ok + [("x-pad", " v")], endStream: false)], "value of"),
        ("grpc-message with LF", [(fields: ok, endStream: false), (fields: [("grpc-status", "0"), ("grpc-message", "a\nb")], endStream: true)], "value of"),
        ("pseudo-header in trailers", [(fields: ok, endStream: false), (fields: [(":status", "200"), ("grpc-status", "0")], endStream: true)], "in trailers"),
        ("request pseudo-header", [(fields: ok + [(":path", "/x")], endStream: false)], ":path"),
        (":status after a regular field", [(fields: [("content-type", "application/grpc"), (":status", "200")], endStream: false)], "after a regular"),
        ("two :status", [(fields: [(":status", "200"), (":status", "200")], endStream: false)], "two :status"),
        (":status of four digits", [(fields: [(":status", "2000")], endStream: false)], ":status"),
        (":status not a number", [(fields: [(":status", "abc")], endStream: false)], ":status"),
        (":status 101", [(fields: [(":status", "101")], endStream: false)], ":status"),
        ("no :status", [(fields: [("content-type", "application/grpc")], endStream: false)], "without :status"),
        ("connection header", [(fields: ok + [("connection", "keep-alive")], endStream: false)], "connection-specific"),
        ("transfer-encoding", [(fields: ok + [("transfer-encoding", "chunked")], endStream: false)], "connection-specific"),
        ("te other than trailers", [(fields: ok + [("te", "gzip")], endStream: false)], "te"),
        ("1xx that ends the stream", [(fields: [(":status", "103")], endStream: true)], "informational"),
        ("trailers without END_STREAM", [(fields: ok, endStream: false), (fields: [("grpc-status", "0")], endStream: false)], "END_STREAM"),
        ("empty name", [(fields: ok + [("", "v")], endStream: false)], "empty name"),
    ])
    func malformed(_ what: String, _ blocks: [Block], _ reason: String) {
        let (end, head) = Self.read(blocks)
        #expect(end == .malformed, "\(what)")
        let malformation = head.malformation ?? ""
        #expect(malformation.contains(reason), "\(what): \(malformation)")
    }

    @Test("a name that is not a token but has no upper case is ignored, as nghttp2 did")
    func oddNamesIgnored() {
        let (end, head) = Self.read([(fields: Self.ok + [("x bad", "v"), ("x\u{1}", "v")], endStream: false), Self.trailers])
        #expect(end == .trailers && head.malformation == nil)
        #expect(head.initialMetadata.isEmpty)
    }

    @Test("a grpc-status that is not a number is UNKNOWN, not malformed")
    func nonNumericGRPCStatus() {
        var (_, head) = Self.read([(fields: Self.ok, endStream: false), (fields: [("grpc-status", "zero")], endStream: true)])
        #expect(head.malformation == nil)
        #expect(head.status(errorCode: 0).code == .unknown)
    }

    @Test("names and values, byte by byte")
    func byteRules() {
        func name(_ text: String) -> Bool { Array(text.utf8).withUnsafeBufferPointer { HeaderName.isValidName($0) } }
        func value(_ text: String) -> Bool { Array(text.utf8).withUnsafeBufferPointer { HeaderName.isValidValue($0) } }
        #expect(name("x-ok") && name("a!#$%&'*+-.^_`|~9z") && !name("") && !name("X") && !name("a b") && !name("a:b"))
        #expect(!name("é") && !name("a\u{7F}"))
        #expect(value("") && value("a b") && value("a\tb") && value("é") && value("~"))
        #expect(!value(" a") && !value("a ") && !value("\ta") && !value("a\t") && !value("a\u{7F}") && !value("a\u{1}b"))
    }

    @Test("numbers: one to ten decimal digits, nothing else", arguments: [
        ("0", 0), ("200", 200), ("0042", 42), ("9999999999", 9_999_999_999),
        ("", nil), ("12345678901", nil), ("-1", nil), ("+1", nil), ("1 ", nil), ("/", nil), (":", nil), ("1a", nil),
    ] as [(String, Int?)])
    func numbers(text: String, expected: Int?) {
        #expect(Array(text.utf8).withUnsafeBufferPointer { HeaderName.parseInt($0) } == expected)
    }
}
