import Testing

@testable import GRPCCMWire

/// A response's header blocks against HTTP/2's rules for responses (RFC 9113 §8.1.1, 8.2, 8.3.2): what nghttp2
/// checked before the client's sessions switched its HTTP checks off, field by field and block by block.
@Suite("ResponseHead: HTTP/2 rules")
struct ResponseHeadTests {
    /// A block: fields, then whether it ends the stream.
    typealias Block = (fields: [(String, String)], endStream: Bool)

    /// Feeds the blocks; returns how the last one ended (or `.malformed` as soon as a field is refused) and the head.
    static func read(_ blocks: [Block], names: MetadataNameCache? = nil) -> (ResponseHead.Block, ResponseHead) {
        var head = ResponseHead(maxHeaderListSize: 16 << 10)
        var last = ResponseHead.Block.headers
        for block in blocks {
            for (name, value) in block.fields {
                let accepted = Array(name.utf8).withUnsafeBufferPointer { n in
                    Array(value.utf8).withUnsafeBufferPointer { v in head.header(name: n, value: v, names: names) }
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
        ("-bin value not base64", [(fields: ok + [("x-trace-bin", "AAEC, not base64!")], endStream: false)], "not base64"),
        ("-bin value in trailers not base64", [(fields: ok, endStream: false), (fields: [("grpc-status", "0"), ("grpc-status-details-bin", "a")], endStream: true)], "not base64"),
    ])
    func malformed(_ what: String, _ blocks: [Block], _ reason: String) {
        // Alone, and again through a name cache that has already seen every name these cases use in a valid
        // response: what was accepted once must not make a malformed field pass.
        let warmed = MetadataNameCache()
        _ = Self.read(Self.everyValidName, names: warmed)
        for names in [nil, warmed] {
            let (end, head) = Self.read(blocks, names: names)
            #expect(end == .malformed, "\(what)")
            let malformation = head.malformation ?? ""
            #expect(malformation.contains(reason), "\(what): \(malformation)")
        }
    }

    /// A valid response with the names of the malformed cases, where a valid use of them exists.
    static let everyValidName: [Block] = [
        (fields: ok + [("te", "trailers"), ("x-bad", "fine"), ("x-pad", "v"), ("x-upper", "v")], endStream: false),
        (fields: [("grpc-status", "0"), ("grpc-message", "ok"), ("x-after", "v")], endStream: true),
    ]

    @Test("through a name cache a response reads exactly as without one; the cache keeps valid names only, and so many")
    func nameCache() throws {
        let names = MetadataNameCache()
        let response: [Block] = [
            (fields: Self.ok + [("x-request-id", "42"), ("x-trace-bin", "AAEC"), ("te", "trailers"), ("x-bad name", "v")], endStream: false),
            (fields: [("grpc-status", "0"), ("x-request-id", "43"), ("x-server", "a-long-enough-value-to-allocate")], endStream: true),
        ]
        let (plainEnd, plain) = Self.read(response)
        for round in 0..<3 {
            let (end, head) = Self.read(response, names: names)
            #expect(end == plainEnd && end == .trailers, "round \(round)")
            #expect(head.initialMetadata == plain.initialMetadata && head.trailingMetadata == plain.trailingMetadata)
        }
        #expect(plain.initialMetadata["x-request-id"] == "42" && plain.trailingMetadata["x-request-id"] == "43")
        #expect(plain.initialMetadata.values(for: "x-trace-bin") == [.binary([0, 1, 2])])
        // x-request-id, x-trace-bin, te, x-server: the name that is not a token (ignored) is not kept.
        #expect(names.count == 4)
        // A kept `te` still has its value checked.
        let (end, head) = Self.read([(fields: Self.ok + [("te", "gzip")], endStream: false)], names: names)
        #expect(end == .malformed && head.malformation?.contains("te") == true)

        // Bounded: past its capacity it keeps no more names, and reads every response all the same.
        let many = (0..<(MetadataNameCache.capacity * 2)).map { ("x-field-\($0)", "v\($0)") }
        let (manyEnd, manyHead) = Self.read([(fields: Self.ok + many, endStream: false), Self.trailers], names: names)
        #expect(manyEnd == .trailers && manyHead.initialMetadata.count == many.count)
        #expect(names.count == MetadataNameCache.capacity)
        let (againEnd, againHead) = Self.read([(fields: Self.ok + many, endStream: false), Self.trailers], names: names)
        #expect(againEnd == .trailers && againHead.initialMetadata == manyHead.initialMetadata)

        // A name longer than the longest kept is read all the same, and not kept.
        let fresh = MetadataNameCache()
        let long = "x-" + String(repeating: "n", count: MetadataNameCache.longestName)
        let (longEnd, longHead) = Self.read([(fields: Self.ok + [(long, "v")], endStream: false), Self.trailers], names: fresh)
        #expect(longEnd == .trailers && longHead.initialMetadata[long] == "v" && fresh.count == 0)
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
        let status = head.status(errorCode: 0)
        #expect(status.code == .unknown)
        #expect(status.message.contains("\"zero\""), "the value is quoted: \(status.message)")
        // In the response headers it says nothing: the trailers' status is the call's.
        var (_, later) = Self.read([
            (fields: Self.ok + [("grpc-status", "zero")], endStream: false), (fields: [("grpc-status", "0")], endStream: true),
        ])
        #expect(later.status(errorCode: 0).code == .ok)
        #expect(later.initialMetadata["grpc-status"] == nil, "not the application's metadata")
        var (_, trailing) = Self.read([(fields: Self.ok, endStream: false), (fields: [("grpc-status", "zero")], endStream: true)])
        _ = trailing.status(errorCode: 0)
        #expect(trailing.trailingMetadata["grpc-status"] == nil)
        // Followed by a number in the same block, it still stands (grpc-go ends the call at the first it cannot
        // read; the number had made it OK), and neither block's metadata keeps the text.
        for (first, second) in [("zero", "0"), ("0", "zero")] {
            var (_, both) = Self.read([
                (fields: Self.ok, endStream: false), (fields: [("grpc-status", first), ("grpc-status", second)], endStream: true),
            ])
            #expect(both.status(errorCode: 0).code == .unknown, "\(first), \(second)")
            #expect(both.trailingMetadata["grpc-status"] == nil)
        }
        var (_, inHeaders) = Self.read([
            (fields: Self.ok + [("grpc-status", "zero"), ("grpc-status", "0")], endStream: false), Self.trailers,
        ])
        #expect(inHeaders.status(errorCode: 0).code == .ok)
        #expect(inHeaders.initialMetadata["grpc-status"] == nil, "not the application's metadata")
    }

    @Test("a space or tab at either end of a value is kept, as grpc-go keeps it: a grpc-message may end with one")
    func surroundingSpacesKept() {
        var (end, head) = Self.read([
            (fields: Self.ok + [("x-pad", " v\t")], endStream: false),
            (fields: [("grpc-status", "5"), ("grpc-message", "invalid name: ")], endStream: true),
        ])
        #expect(end == .trailers && head.malformation == nil)
        #expect(head.initialMetadata["x-pad"] == " v\t")
        #expect(head.status(errorCode: 0) == CallStatus(code: .notFound, message: "invalid name: "))
    }

    @Test("trailers without grpc-status are UNKNOWN and keep the server's grpc-message")
    func trailersWithoutStatusKeepTheMessage() {
        var (_, head) = Self.read([(fields: Self.ok, endStream: false), (fields: [("grpc-message", "quota exceeded")], endStream: true)])
        #expect(head.status(errorCode: 0) == CallStatus(code: .unknown, message: "trailers without grpc-status: quota exceeded"))
    }

    @Test("the status is the trailers' (or a trailers-only block's): one in the response headers or a 1xx is not")
    func statusOnlyFromTheLastBlock() {
        // Response headers that carry grpc-status 0, then a reset: the reset decides, not the early status.
        var (end, head) = Self.read([(fields: Self.ok + [("grpc-status", "0"), ("grpc-message", "early")], endStream: false)])
        #expect(end == .headers && head.grpcStatus == nil && head.grpcMessage == nil)
        #expect(head.status(errorCode: 2).code == .internal)
        #expect(head.status(errorCode: 0).message.contains("without grpc-status"))
        (end, head) = Self.read([
            (fields: [(":status", "103"), ("grpc-status", "0")], endStream: false),
            (fields: Self.ok, endStream: false), (fields: [("grpc-status", "7"), ("grpc-message", "no")], endStream: true),
        ])
        #expect(end == .trailers && head.status(errorCode: 0) == CallStatus(code: .permissionDenied, message: "no"))
    }

    @Test("nothing of a 1xx block carries over to the response: its content-type and grpc-encoding are not the response's")
    func informationalFieldsDoNotCarryOver() {
        // A 1xx naming application/grpc before a 200 page of HTML: not a gRPC response.
        var (end, head) = Self.read([
            (fields: [(":status", "103"), ("content-type", "application/grpc")], endStream: false),
            (fields: [(":status", "200"), ("content-type", "text/html")], endStream: false),
        ])
        #expect(end == .notGRPC)
        #expect(head.notGRPCResponse()?.code == .unknown)
        // A 1xx naming gzip before a response that names no encoding: its messages are not compressed.
        (end, head) = Self.read([
            (fields: [(":status", "100"), ("grpc-encoding", "gzip")], endStream: false), (fields: Self.ok, endStream: false),
        ])
        #expect(end == .headers && head.grpcEncoding == nil && head.contentType == nil)
        // One without content-type after a 1xx that had one: none.
        (end, head) = Self.read([
            (fields: [(":status", "100"), ("content-type", "application/grpc")], endStream: false),
            (fields: [(":status", "200")], endStream: false),
        ])
        #expect(end == .notGRPC && head.notGRPCResponse()?.code == .unknown)
    }

    @Test(
        "response headers that are not gRPC's: the status gRPC maps them to",
        arguments: [
            (":status 200, application/grpc", Self.ok, nil),
            ("+proto", [(":status", "200"), ("content-type", "application/grpc+proto")], nil),
            ("parameters, upper case", [(":status", "200"), ("content-type", "Application/GRPC; x=y")], nil),
            ("503 page", [(":status", "503"), ("content-type", "text/html")], StatusCode.unavailable),
            ("404", [(":status", "404"), ("content-type", "application/grpc")], .unimplemented),
            ("401", [(":status", "401")], .unauthenticated),
            ("200 html", [(":status", "200"), ("content-type", "text/html")], .unknown),
            ("200 no content-type", [(":status", "200")], .unknown),
            ("grpc-web", [(":status", "200"), ("content-type", "application/grpc-web")], .unknown),
            ("a longer word", [(":status", "200"), ("content-type", "application/grpcx")], .unknown),
        ] as [(String, [(String, String)], StatusCode?)])
    func notGRPC(_ what: String, _ fields: [(String, String)], _ code: StatusCode?) {
        var (end, head) = Self.read([(fields: fields, endStream: false)])
        #expect(end == (code == nil ? .headers : .notGRPC), "\(what)")
        #expect(head.notGRPCResponse()?.code == code, "\(what)")
    }

    @Test("names and values, byte by byte")
    func byteRules() {
        func name(_ text: String) -> Bool { Array(text.utf8).withUnsafeBufferPointer { HeaderName.isValidName($0) } }
        func value(_ text: String) -> Bool { Array(text.utf8).withUnsafeBufferPointer { HeaderName.isValidValue($0) } }
        #expect(name("x-ok") && name("a!#$%&'*+-.^_`|~9z") && !name("") && !name("X") && !name("a b") && !name("a:b"))
        #expect(!name("é") && !name("a\u{7F}"))
        // Every byte against the token list the constant tables encode.
        let token = Set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz".utf8)
        for byte in UInt8.min...UInt8.max {
            #expect([byte].withUnsafeBufferPointer { HeaderName.isValidName($0) } == token.contains(byte), "byte \(byte)")
        }
        func binary(_ text: String) -> Bool { Array(text.utf8).withUnsafeBufferPointer { HeaderName.isBinary($0) } }
        #expect(binary("x-bin") && binary("-bin") && !binary("bin") && !binary("x-bin-") && !binary("x-bi"))
        #expect(value("") && value("a b") && value("a\tb") && value("é") && value("~"))
        // Spaces and tabs at either end too, as grpc-go takes them (RFC 9113 would not).
        #expect(value(" a") && value("a ") && value("\ta") && value("a\t"))
        #expect(!value("a\u{7F}") && !value("a\u{1}b") && !value("a\rb") && !value("a\nb") && !value("a\u{0}b"))
    }

    @Test("numbers: one to ten decimal digits, nothing else", arguments: [
        ("0", 0), ("200", 200), ("0042", 42), ("9999999999", 9_999_999_999),
        ("", nil), ("12345678901", nil), ("-1", nil), ("+1", nil), ("1 ", nil), ("/", nil), (":", nil), ("1a", nil),
    ] as [(String, Int?)])
    func numbers(text: String, expected: Int?) {
        #expect(Array(text.utf8).withUnsafeBufferPointer { HeaderName.parseInt($0) } == expected)
    }
}
